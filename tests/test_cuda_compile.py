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
        # format x dtype x batch tile compiled without spills (compile_check_cuda raises on any spill). A down
        # format of its own (down_weight_format) pairs these same kernels: no kernel more, none fewer.
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


def test_cuda_library_host_side_of_block_formats():
    """What the CUDA library decides on the host for block weights, before any CUDA call (no GPU needed): it sizes
    a workspace for them (v1's pipeline; v2 serves float weights only), refuses block arrays that are not 4-byte
    aligned and sizes the CPU library refuses too, and tda_block_linear / tda_block_dequantize check as the CPU
    library does (shared common.h) and need no workspace."""
    import ctypes

    from tda_export.kernels import abi

    lib = abi.Library(build.build_cuda())
    for name in ("q8_0", "q4_0", "q4_1"):
        code = abi.WEIGHT_FORMAT_CODE[name]
        args = abi.DecodeArgs(dtype=abi.DTYPE_CODE["bfloat16"], batch=1, hidden=4096, intermediate=14335,
                              weight_format=code)
        v1 = lib.workspace_size("tda_sparse_gated_mlp_decode", args)
        args.version = 2
        assert v1 > 0 and lib.workspace_size("tda_sparse_gated_mlp_decode", args) == v1  # v2 -> v1
        args.hidden = 4008  # a multiple of 8, not of 32
        assert lib.workspace_size("tda_sparse_gated_mlp_decode", args) == 0  # H % 32: refused
        assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 4  # TDA_ERR_BAD_SIZE
        # A block array 2 bytes off: TDA_ERR_MISALIGNED before anything is launched (host buffers: never read).
        args.hidden, args.version = 64, 0
        buf = (ctypes.c_uint8 * 4096)()
        base = (ctypes.addressof(buf) + 255) // 256 * 256
        need = lib.workspace_size("tda_sparse_gated_mlp_decode", args)
        ws = (ctypes.c_uint8 * (need + 256))()
        ws_ptr = (ctypes.addressof(ws) + 255) // 256 * 256
        for f in ("hidden_states", "output", "down_weight_t", "active_idx", "active_count"):
            setattr(args, f, base)
        args.gate_up_weight = base + 2
        assert lib.call_status("tda_sparse_gated_mlp_decode", args, ws_ptr, need) == 6
        la = abi.BlockLinearArgs(weight_format=code, m=1, n=8, k=64, n_begin=0, n_end=8, ldx=64, ldy=8, x=base,
                                 weight=base + 2, y=base)
        assert lib.workspace_size("tda_block_linear", la) == 0
        assert lib.call_status("tda_block_linear", la, 0, 0) == 6
        la.k = 48
        assert lib.call_status("tda_block_linear", la, 0, 0) == 4
        la.k, la.m = 64, 0
        assert lib.call_status("tda_block_linear", la, 0, 0) == 0  # M = 0: nothing to do, nothing launched
        assert lib.block_dequantize_status(code, 64, 0, 0, 0, 64) == 0
        assert lib.block_dequantize_status(code, 64, 1, base + 2, base, 64) == 6
        assert lib._lib.tda_block_bytes(code) == contract_block_bytes(name)
    _own_down_format_host_side(lib)
    _x_format_host_side(lib)


def _own_down_format_host_side(lib):
    """down_weight_format (ABI 6): down_weight_t in a block format of its own under block gate/up rows. The v1
    workspace does not depend on it (v2 still hands block weights to v1), down_weight_t's pointer is checked for
    4-byte alignment, and the pairs outside the contract are refused as the CPU library refuses them."""
    import ctypes

    from tda_export.kernels import abi
    from tda_export.kernels.abi import DOWN_WEIGHT_FORMAT_CODE, WEIGHT_FORMAT_CODE, cpu_library

    def args(wf, down, **kw):
        return abi.DecodeArgs(**dict(dict(dtype=abi.DTYPE_CODE["float16"], batch=3, hidden=4096, intermediate=14335,
                                          weight_format=WEIGHT_FORMAT_CODE[wf],
                                          down_weight_format=DOWN_WEIGHT_FORMAT_CODE[down]), **kw))

    fn = "tda_sparse_gated_mlp_decode"
    for wf in ("q4_1", "q4_0", "q8_0"):
        same = lib.workspace_size(fn, args(wf, "same"))
        for down in ("q8_0", "q4_0", "q4_1"):
            assert lib.workspace_size(fn, args(wf, down)) == same > 0, (wf, down)
            assert lib.workspace_size(fn, args(wf, down, version=2)) == same, (wf, down)  # v2 -> v1
    cpu = cpu_library()
    for bad in (args("dtype", "q8_0"), args("q4_1", "same", down_weight_format=4),
                args("q4_1", "same", down_weight_format=-1)):
        assert lib.workspace_size(fn, bad) == 0 and cpu.workspace_size(fn, bad) == 0
        assert lib.call_status(fn, bad, 0, 0) == cpu.call_status(fn, bad, 0, 0) == 2  # TDA_ERR_BAD_DTYPE
    # gate_up aligned, down_weight_t (q8_0 rows under q4_1) 2 bytes off: TDA_ERR_MISALIGNED, nothing launched.
    buf = (ctypes.c_uint8 * 4096)()
    base = (ctypes.addressof(buf) + 255) // 256 * 256
    a = args("q4_1", "q8_0", hidden=64, intermediate=8, batch=1)
    need = lib.workspace_size(fn, a)
    ws = (ctypes.c_uint8 * (need + 256))()
    ws_ptr = (ctypes.addressof(ws) + 255) // 256 * 256
    for f in ("hidden_states", "output", "gate_up_weight", "active_idx", "active_count"):
        setattr(a, f, base)
    a.down_weight_t = base + 2
    assert lib.call_status(fn, a, ws_ptr, need) == 6


def _x_format_host_side(lib):
    """x_format (ABI 7): the CUDA library reads x as is only. TDA_X_Q8_0 is TDA_ERR_BAD_DTYPE for the decode (v1
    and v2, float or block weights) and the block linear, its workspace queries size nothing, and codes outside
    the enum are refused as the CPU library refuses them; x_format 0 keeps version 6's workspace."""
    import ctypes

    from tda_export.kernels import abi

    cpu = abi.cpu_library()
    fn = "tda_sparse_gated_mlp_decode"
    buf = (ctypes.c_uint8 * 4096)()
    base = (ctypes.addressof(buf) + 255) // 256 * 256
    for wf in ("dtype", "q8_0", "q4_0", "q4_1"):
        for version in (0, 1, 2):
            a = abi.DecodeArgs(dtype=abi.DTYPE_CODE["bfloat16"], batch=2, hidden=4096, intermediate=14336,
                               version=version, weight_format=abi.WEIGHT_FORMAT_CODE[wf])
            same = lib.workspace_size(fn, a)
            assert same > 0
            for code in (1, 2, -1):
                a.x_format = code
                assert lib.workspace_size(fn, a) == 0, (wf, version, code)
                assert lib.call_status(fn, a, 0, 0) == 2, (wf, version, code)  # TDA_ERR_BAD_DTYPE, nothing launched
                if code != 1 or wf == "dtype":
                    assert cpu.workspace_size(fn, a) == 0 and cpu.call_status(fn, a, 0, 0) == 2
            a.x_format = 0
            assert lib.workspace_size(fn, a) == same
        la = abi.BlockLinearArgs(weight_format=abi.WEIGHT_FORMAT_CODE[wf], m=1, n=8, k=64, n_begin=0, n_end=8, ldx=64,
                                 ldy=8, x=base, weight=base, y=base)
        for code in (1, 2, -1):
            la.x_format = code
            assert lib.workspace_size("tda_block_linear", la) == 0
            assert lib.call_status("tda_block_linear", la, 0, 0) == 2, (wf, code)
            if code != 1 or wf == "dtype":
                assert cpu.call_status("tda_block_linear", la, 0, 0) == 2, (wf, code)
    assert "x_format" in lib.status_string(2)


def contract_block_bytes(name: str) -> int:
    from tda_export.ops.contract import BLOCK_FORMATS

    return BLOCK_FORMATS[name].block_bytes
