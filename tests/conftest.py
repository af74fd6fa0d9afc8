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
