"""TensorRT plans with the tda plugins: Python plugins (plugins.py over the C++ logic, logic.py),
the plan builder (plan.py -> builder.py in a child process), and the runtime backend (backend.py)."""
