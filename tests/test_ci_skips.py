"""tests/ci_skips.py: with CI=true a skip fails, naming its reason, except GPU tests and the allowed reasons."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CASES = '''
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="nvcc not installed")
def test_needs_nvcc():
    pass

def test_fixture_skips(request):
    pytest.skip("cmake not found")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_gpu():
    pass

@pytest.mark.skipif(True, reason="TensorRT headers not found: set TDA_TRT_INCLUDE")
def test_trt_headers():
    pass
'''


def run(tmp_path, env_overrides, body=CASES):
    (tmp_path / "test_cases.py").write_text(body)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TDA_REQUIRE_ALL")}
    env.update(env_overrides, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-q", "-rfEs", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_skips_stay_skips_outside_ci(tmp_path):
    r = run(tmp_path, {})
    assert r.returncode == 0 and "1 passed, 4 skipped" in r.stdout, r.stdout


def test_ci_turns_skips_of_required_tests_into_failures(tmp_path):
    for env in ({"CI": "true"}, {"TDA_REQUIRE_ALL": "1"}):
        r = run(tmp_path, env)
        # a skip in setup (skipif) reports as an error, one in the test body as a failure: both fail the run
        assert r.returncode == 1 and "1 failed, 1 passed, 2 skipped, 1 error" in r.stdout, r.stdout
        assert "ERROR test_cases.py::test_needs_nvcc - skipped where every test must run" in r.stdout, r.stdout
        assert "FAILED test_cases.py::test_fixture_skips - skipped where every test must run" in r.stdout, r.stdout
        assert "SKIPPED [1] test_cases.py:14: needs a CUDA GPU" in r.stdout, r.stdout
        assert "TensorRT headers not found" in r.stdout.split("SKIPPED")[-1], r.stdout


def test_ci_fails_a_file_skipped_at_import(tmp_path):
    body = 'import pytest\npytest.importorskip("tda_no_such_module", reason="tda_no_such_module not installed")\n' \
           'def test_x():\n    pass\n'
    (tmp_path / "test_other.py").write_text("def test_y():\n    pass\n")
    r = run(tmp_path, {"CI": "true"}, body)
    assert r.returncode != 0 and "ERROR test_cases.py - skipped where every test must run" in r.stdout, r.stdout
    assert "tda_no_such_module not installed" in r.stdout, r.stdout
    r = run(tmp_path, {}, body)
    assert r.returncode == 0 and "1 passed, 1 skipped" in r.stdout, r.stdout
