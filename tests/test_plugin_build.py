"""plugins/CMakeLists.txt's cuBLAS fallback, plugins/pip_cublas.py: where PyPI's nvidia-cublas keeps
include/ and lib/ (the CUDA 13 wheel under nvidia/cu13, the CUDA 12 one under nvidia/cublas), found from
the wheel's RECORD in the Python CMake runs, so a toolkit without cuBLAS needs no hand-set path."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "plugins" / "pip_cublas.py"


def _fake_wheel(site: Path, name: str, version: str, top: str, major: str, header: bool = True) -> Path:
    """An installed wheel as importlib.metadata sees it: dist-info with METADATA and RECORD, and the files."""
    files = [f"{top}/lib/libcublas.so.{major}", f"{top}/lib/libcublasLt.so.{major}"]
    if header:
        files.append(f"{top}/include/cublas_v2.h")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_bytes(b"")
    return site / top


def _root(site: Path, major: str) -> str:
    r = subprocess.run([sys.executable, str(SCRIPT), major], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("name, version, top, major", [("nvidia-cublas", "13.1.0.3", "nvidia/cu13", "13"),
                                                       ("nvidia-cublas-cu12", "12.9.1.4", "nvidia/cublas", "12")])
def test_plugin_build_finds_pypi_cublas(tmp_path, name, version, top, major):
    root = _fake_wheel(tmp_path / "site", name, version, top, major)
    assert _root(tmp_path / "site", major) == str(root)
    assert _root(tmp_path / "site", "11") == ""  # another CUDA major: not this wheel


def test_plugin_build_pypi_cublas_without_headers(tmp_path):
    _fake_wheel(tmp_path / "site", "nvidia-cublas", "13.1.0.3", "nvidia/cu13", "13", header=False)
    assert _root(tmp_path / "site", "13") == ""  # CMake then names what is missing


def test_plugin_build_pypi_cublas_usage():
    r = subprocess.run([sys.executable, str(SCRIPT), "cu13"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "usage: python pip_cublas.py CUDA_MAJOR" in r.stderr
