def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes (e.g. the nvcc compile/spill check)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")
