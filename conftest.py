import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))  # shared test helpers (tiny_models, op_cases)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model or runs long (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "trt: needs the tensorrt_rtx package (skipped when it is not importable)")
