import time

import pytest

from tiny_models import FAMILIES, save_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> saved HF directory of a tiny random-weight model."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def smollm2():
    from tda_export.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def served_engine_dir(tiny_dirs, tmp_path_factory):
    """A calibrated tiny Llama engine (density 0.5 built in), shared by the scheduler and server tests."""
    from test_runtime import build_engine

    tmp = tmp_path_factory.mktemp("served")
    out, _ = build_engine(tiny_dirs["llama"], tmp / "engine", tmp)
    return out


@pytest.fixture
def slow_decode(monkeypatch):
    """slow_decode(engine, seconds): every decode step of the engine's backend takes `seconds` more (the tiny
    models decode too fast to watch a queue drain or a client leave) until the test ends; returns a one-item
    list counting the steps."""
    def slow_down(engine, seconds):
        steps = [0]

        def slowed(call):
            def slow(*args, **kwargs):
                time.sleep(seconds)
                steps[0] += 1
                return call(*args, **kwargs)
            return slow
        for name in ("decode", "step"):  # step: continuous batching's decode step
            if hasattr(engine.backend, name):
                monkeypatch.setattr(engine.backend, name, slowed(getattr(engine.backend, name)))
        return steps
    return slow_down
