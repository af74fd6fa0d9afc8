"""The CUDA kernels (float and block-quantized weights), and the TensorRT plugins' device code
(plugins/gated_act.cu, plugins/dequant.cu), compile for sm_80/89/90 without register spills, and the library
links and loads (no GPU needed for either).

About 1 minute for the check and 40 s for the library on a 2-core box."""
from pathlib import Path

import pytest

from tda_export.kernels import build

pytestmark = pytest.mark.skipif(build.nvcc_path() is None, reason="nvcc not installed")


def test_compile_check_no_spills():
    report = build.compile_check_cuda(build.CUDA_ARCHS)
    assert set(report) == {f"sm_{a}" for a in build.CUDA_ARCHS}
    for arch, kernels in report.items():
        assert any("gate_up_mma" in k for k in kernels), arch
        assert any("down_proj" in k for k in kernels), arch
        for v2 in ("union_segments", "gate_up_v2", "down_v2"):  # decode v2 (decode_v2.cu)
            assert any(v2 in k for k in kernels), (arch, v2)
        # Block-quantized weights (decode.cu's gate_up_q and down_proj<.., BlockRows>, block_linear.cu): every
        # format x dtype x batch tile compiled without spills (compile_check_cuda raises on any spill).
        names = build._demangle(list(kernels)).values()
        for code in (1, 2, 3):  # tda_weight_format_t Q8_0, Q4_0, Q4_1 as c++filt writes them
            fmt = f"(tda_weight_format_t){code}"
            assert sum("gate_up_q<" in n and fmt in n for n in names) == 6, (arch, fmt)  # 3 dtypes x NB 1, 8
            assert sum("down_proj<" in n and f"BlockRows<{fmt}>" in n for n in names) == 9, (arch, fmt)  # x BT 1/4/8
            assert sum("block_gemv<" in n and fmt in n for n in names) == 3, (arch, fmt)  # NB 1, 4, 8
            assert sum("dequantize_f32<" in n and fmt in n for n in names) == 1, (arch, fmt)


def test_cuda_library_builds_and_loads():
    from tda_export.kernels import abi
    from tda_export.kernels.abi import Library

    lib = Library(build.build_cuda())
    assert lib.backend == "cuda" and lib.abi_version == abi.ABI_VERSION
    assert lib.status_string(0) == "ok"


def test_cuda_archs_from_environment(monkeypatch):
    monkeypatch.delenv("TDA_CUDA_ARCHS", raising=False)
    assert build.cuda_archs() == build.CUDA_ARCHS
    monkeypatch.setenv("TDA_CUDA_ARCHS", "sm_90")
    assert build.cuda_archs() == ("90",)
    assert build._gencode(build.cuda_archs()) == ["-gencode=arch=compute_90,code=sm_90",
                                                  "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TDA_CUDA_ARCHS", "hopper")
    with pytest.raises(build.BuildError, match="TDA_CUDA_ARCHS"):
        build.cuda_archs()


def test_plugin_device_code_builds_no_spills():
    """The TensorRT plugins' device code (plugins/gated_act.cu, the prefill's gated activation; plugins/dequant.cu,
    the prefill's dequantization of block weights to T) needs no TensorRT header, so CI compiles it for
    sm_80/89/90 as plugins/CMakeLists.txt does, with no spills."""
    plugins = Path(__file__).resolve().parents[1] / "plugins"
    report = build.compile_check_cuda(build.CUDA_ARCHS, sources=[plugins / "gated_act.cu", plugins / "dequant.cu"])
    assert set(report) == {f"sm_{a}" for a in build.CUDA_ARCHS}
    for arch, kernels in report.items():
        names = build._demangle(list(kernels))
        for t in ("float", "__half", "__nv_bfloat16"):  # one kernel per dtype x activation / weight format
            assert sum(f"gated<{t}," in n for n in names.values()) == 4, (arch, t, sorted(names.values()))
            assert sum("dequantize<" in n and f", {t}>" in n for n in names.values()) == 3, (arch, t)
