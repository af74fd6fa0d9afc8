import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))  # shared test helpers (tiny_models, op_cases)

pytest_plugins = ["ci_skips"]  # in CI a skip fails unless it needs a GPU or TensorRT's headers (tests/ci_skips.py)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real pretrained model or runs long (CI runs them)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "trt: needs the tensorrt-rtx-cu13 package; skipped without it")
