"""TensorRT plans with the tda plugins. What both building and running a plan use lives here: the Python
plugins (plugins.py over the C++ plugins' logic, logic.py; device.py for their torch work), the TensorRT
flavour (flavour.py) and the build-time goldens `check` compares against (goldens.py). Building plans:
build/ (plan.py -> builder.py in a child process). Running them: tda_export.runtime.trt_backend."""
