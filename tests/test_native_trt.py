"""The TensorRT executor of the C++ runtime (cpp/src/trt_executor.cpp), as far as a machine without a GPU
goes: a real TensorRT-RTX plan engine, opened by the CPU build (a clear error: no TensorRT executor in
this build) and by a build configured against TensorRT's headers (compile-checked; then each step up to
the GPU: flavour check, dlopen of the TensorRT library, its version check). No plan is deserialized
or run here; that needs a GPU (docs/native.md, TensorRT executor).

The TensorRT build needs TensorRT's headers, which CI cannot fetch: set TDA_TRT_INCLUDE to the directory
holding NvInferRuntime.h (an SDK's include/, the TensorRT OSS repository's include/); the tests that need
it skip with that reason otherwise.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tda_export.native import build_native
from tda_export.native.binding import NativeEngine, NativeError
from test_runtime import build_engine

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (it builds the plan these tests open)")

from tda_export.kernels.build import nvcc_path  # noqa: E402

pytestmark = [pytest.mark.trt, pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed")]

TDA_RT_ERR_ENGINE, TDA_RT_ERR_UNSUPPORTED = 2, 4
CONVENTIONAL = ("/usr/include/x86_64-linux-gnu", "/usr/local/tensorrt/include", "/opt/tensorrt/include")


def tensorrt_include() -> Path | None:
    for d in [os.environ.get("TDA_TRT_INCLUDE", ""), *CONVENTIONAL]:
        if d and (Path(d) / "NvInferRuntime.h").is_file():
            return Path(d)
    return None


def header_major(include: Path) -> str:
    """NV_TENSORRT_MAJOR of the headers (TensorRT 11 spells it through TRT_MAJOR_ENTERPRISE)."""
    text = (include / "NvInferVersion.h").read_text()
    m = re.search(r"#define\s+(?:TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MAJOR)\s+(\d+)", text)
    assert m, "NvInferVersion.h names no major version"
    return m.group(1)


def rtx_library() -> Path:
    import tensorrt_rtx_libs

    return Path(tensorrt_rtx_libs.__file__).parent / "libtensorrt_rtx.so.1"


@pytest.fixture(scope="module")
def rtx_engine(tiny_dirs, tmp_path_factory):
    """A tiny Llama fp16 engine with a real TensorRT-RTX plan (one target keeps the build short)."""
    from tda_export.export.build import build
    from tda_export.trt.build.plan import PlanOptions

    out = tmp_path_factory.mktemp("native-trt") / "llama-rtx"
    return build(str(tiny_dirs["llama"]), out, "float16", progress=False,
                 plan=PlanOptions(target="tensorrt-rtx", max_batch=2, max_seq_len=64, max_prompt=32,
                                  compute_capabilities=("8.6",)))


def tda_run(build, engine, *args):
    return subprocess.run([str(build.cli), "-e", str(engine), "--prompt-ids", "5,6,7", "-n", "2", *args],
                          capture_output=True, text=True, timeout=120)


def test_cpu_build_says_it_has_no_tensorrt_executor(rtx_engine):
    """auto picks TensorRT for an engine with a plan; the CPU build says what to rebuild with, no crash."""
    native = build_native()
    with pytest.raises(NativeError) as err:
        NativeEngine(rtx_engine)
    assert err.value.status == TDA_RT_ERR_UNSUPPORTED
    assert "built without the TensorRT executor" in str(err.value) and "-DTDA_TENSORRT_INCLUDE" in str(err.value)
    assert "model.plan" in str(err.value)
    for executor in ("auto", "tensorrt"):
        res = tda_run(native, rtx_engine, "--executor", executor)
        assert res.returncode == 2 and "built without the TensorRT executor" in res.stderr, res.stderr
    # the CPU executor itself refuses the fp16 weights, naming the dtype
    res = tda_run(native, rtx_engine, "--executor", "cpu")
    assert res.returncode == 2 and "float32" in res.stderr and "float16" in res.stderr, res.stderr


@pytest.fixture(scope="module")
def trt_build():
    include = tensorrt_include()
    if include is None:
        pytest.skip("TensorRT headers not found: set TDA_TRT_INCLUDE to the directory holding NvInferRuntime.h "
                    "(CI cannot fetch them)")
    return build_native(tensorrt_include=include)


def test_tensorrt_build_links_no_tensorrt_nor_cuda_library(trt_build):
    """TensorRT is dlopened and the CUDA runtime linked statically: the library loads where neither is."""
    needed = subprocess.run(["readelf", "-d", str(trt_build.library)], capture_output=True, text=True, check=True).stdout
    needed = [line for line in needed.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "nvinfer" in n or "tensorrt" in n or "cudart" in n or "libcuda" in n]
    syms = subprocess.run(["nm", "-D", "--defined-only", str(trt_build.library)], capture_output=True, text=True).stdout
    assert "tda_rt_engine_open_with" in syms


def test_tensorrt_build_runs_the_cpu_executor_unchanged(trt_build, tiny_dirs, tmp_path):
    engine, _ = build_engine(tiny_dirs["llama"], tmp_path / "fp32", tmp_path)
    res = subprocess.run([str(trt_build.tests), str(engine)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cpu = tda_run(build_native(), engine, "--executor", "cpu", "--print-ids")
    both = tda_run(trt_build, engine, "--print-ids")  # auto: no plan, so the CPU executor
    assert cpu.returncode == both.returncode == 0, cpu.stderr + both.stderr
    assert cpu.stdout == both.stdout and "backend native-cpu" in both.stderr


def relabelled(engine: Path, tmp_path: Path, flavour: str, version: str) -> Path:
    """A copy whose manifest claims another TensorRT flavour: the plan bytes stay RTX's, but every step
    before deserialization only reads the manifest, so this reaches the library loading for real."""
    out = tmp_path / f"{flavour}-engine"
    shutil.copytree(engine, out)
    m = json.loads((out / "manifest.json").read_text())
    m["tensorrt"].update(flavour=flavour, version=version, compute_capabilities=[])
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_tensorrt_build_stops_before_the_gpu_with_clear_errors(trt_build, rtx_engine, tmp_path):
    flavour = subprocess.run([str(trt_build.cli), "--help"], capture_output=True, text=True).stdout
    assert "--executor" in flavour and "--tensorrt-library" in flavour and "--plugin-library" in flavour
    # 1. the plan is TensorRT-RTX and the headers are full TensorRT's: different C++ ABIs
    res = tda_run(trt_build, rtx_engine)
    assert res.returncode == 2, res.stderr
    assert "is a tensorrt-rtx plan" in res.stderr and "compiled against tensorrt" in res.stderr, res.stderr
    # 2. a (datacenter) tensorrt engine: libnvinfer.so.<major> is not installed here
    major = header_major(tensorrt_include())
    dc = relabelled(rtx_engine, tmp_path, "tensorrt", f"{major}.0.0.1")
    res = tda_run(trt_build, dc, "--executor", "tensorrt")
    assert res.returncode == 2 and f"libnvinfer.so.{major}: cannot be loaded" in res.stderr, res.stderr
    assert "--tensorrt-library" in res.stderr and "Traceback" not in res.stderr
    # 3. the RTX wheel's real library passed as TensorRT: dlopen and dlsym succeed, its version is refused
    res = tda_run(trt_build, dc, "--tensorrt-library", str(rtx_library()))
    assert res.returncode == 2, res.stderr
    assert "is TensorRT 1." in res.stderr and "C++ ABI differs" in res.stderr, res.stderr
    # 4. a library that is not TensorRT at all
    res = tda_run(trt_build, dc, "--tensorrt-library", str(trt_build.library))
    assert res.returncode == 2 and "not a TensorRT library" in res.stderr, res.stderr
