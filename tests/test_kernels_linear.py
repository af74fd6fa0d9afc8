"""tda_block_linear / tda_block_dequantize (ABI 5) on the CPU library: the dense block-quantized linear
against a float64 reference of the same dequantized weights (ops/blocks.dequantize), on every SIMD variant
this machine runs, with poisoned outputs, odd shapes, M = 0/1/4/prefill sizes and split row ranges."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from tda_export.kernels import abi, testing
from tda_export.ops import blocks, contract

FORMATS = tuple(contract.BLOCK_FORMATS)
ISAS = ("generic", "avx2", "best")  # TDA_CPU_ISA caps (a cap above the CPU falls back to the best it has)
# (N, K): K a multiple of 32, N odd / prime / a real SmolLM2 shape.
SHAPES = ((1, 32), (13, 96), (37, 160), (576, 1536))
TOLERANCE = 2e-6  # fp32 sums of at most 1536 terms against float64, relative to |x| . |w|


def _problem(name, m, n, k, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    wb = blocks.quantize(name, w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(wb)), blocks.dequantize(name, wb)


def _check(y, x, wd, n_begin=0, n_end=None):
    """y[:, n_begin:n_end] within fp32 noise of the float64 product, and NaN (untouched) elsewhere."""
    n_end = wd.shape[0] if n_end is None else n_end
    y = y.numpy()
    xd = x.numpy().astype(np.float64)
    ref = xd @ wd.astype(np.float64).T
    scale = np.abs(xd) @ np.abs(wd.astype(np.float64)).T
    part = slice(n_begin, n_end)
    assert np.isfinite(y[:, part]).all()
    err = np.abs(y[:, part] - ref[:, part]) / np.maximum(scale[:, part], 1e-30)
    assert err.max(initial=0.0) < TOLERANCE, err.max()
    outside = np.ones(y.shape[1], bool)
    outside[part] = False
    assert np.isnan(y[:, outside]).all(), "wrote outside [n_begin, n_end)"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", (1, 2, 4, 7))
def test_linear_matches_fp64_reference(monkeypatch, isa, name, n, k, m):
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    x, wb, wd = _problem(name, m, n, k, zlib.crc32(f"{name}{n}{k}{m}".encode()))
    status, y = testing.run_block_linear(x, wb, name)
    assert status == abi.TDA_OK
    _check(y, x, wd)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_linear_prefill_sizes(monkeypatch, isa, name):
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for m in (33, 128):
        x, wb, wd = _problem(name, m, 37, 192, m)
        status, y = testing.run_block_linear(x, wb, name)
        assert status == abi.TDA_OK
        _check(y, x, wd)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_row_ranges_split_exactly(monkeypatch, isa, name):
    """Any split of [0, N) into calls writes only its columns and gives the full call's bits (a thread pool
    splits N this way); strided x and y (ldx > K, ldy > N) are honoured."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for m in (1, 4, 5):
        x, wb, wd = _problem(name, m, 45, 96, 7 + m)
        status, full = testing.run_block_linear(x, wb, name)
        assert status == abi.TDA_OK
        for n_begin, n_end in ((0, 1), (3, 17), (17, 45), (44, 45), (5, 5)):
            status, part = testing.run_block_linear(x, wb, name, n_begin, n_end)
            assert status == abi.TDA_OK
            _check(part, x, wd, n_begin, n_end)
            np.testing.assert_array_equal(part[:, n_begin:n_end].numpy(), full[:, n_begin:n_end].numpy())
        wide = torch.full((m, 96 + 11), float("nan"))
        wide[:, :96] = x
        y = torch.full((m, 45 + 3), float("nan"))
        status, _ = testing.run_block_linear(wide[:, :96], wb, name, out=y[:, :45])
        assert status == abi.TDA_OK
        np.testing.assert_array_equal(y[:, :45].numpy(), full.numpy())
        assert torch.isnan(y[:, 45:]).all()


@pytest.mark.parametrize("name", FORMATS)
def test_isas_agree(monkeypatch, name):
    """Every variant computes the same products (within fp32 noise; sums are ordered differently)."""
    x, wb, wd = _problem(name, 4, 37, 576, 3)
    outs = []
    for isa in ISAS:
        monkeypatch.setenv("TDA_CPU_ISA", isa) if isa != "best" else monkeypatch.delenv("TDA_CPU_ISA", raising=False)
        status, y = testing.run_block_linear(x, wb, name)
        assert status == abi.TDA_OK
        outs.append(y.numpy())
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FORMATS)
def test_batch_zero_reads_nothing(name):
    lib = abi.cpu_library()
    args = abi.BlockLinearArgs(weight_format=abi.WEIGHT_FORMAT_CODE[name], m=0, n=5, k=64, n_begin=0, n_end=5,
                               ldx=64, ldy=5, x=None, weight=None, y=None)
    assert lib.call_status("tda_block_linear", args, 0, 0) == abi.TDA_OK
    assert lib.workspace_size("tda_block_linear", args) == 0
    assert lib.block_dequantize_status(abi.WEIGHT_FORMAT_CODE[name], 64, 0, 0, 0, 64) == abi.TDA_OK


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_is_bit_exact(monkeypatch, isa, name):
    """tda_block_dequantize gives ops/blocks.dequantize's float32 values bit for bit, arbitrary bytes included
    (zero, -0, subnormal and fp16-max scales; NaN scales stay NaN), into a strided output."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    bb = contract.BLOCK_FORMATS[name].block_bytes
    raw = rng.integers(0, 256, (9, 3 * bb), dtype=np.uint8)
    scales = np.array([0x0000, 0x8000, 0x0001, 0x83ff, 0x7bff, 0xfbff, 0x3c00, 0x7e00, 0x1234], dtype="<u2")
    raw[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    with np.errstate(invalid="ignore", over="ignore"):  # inf scales times 0, NaN minimums: arbitrary bytes
        ref = blocks.dequantize(name, raw)
    out = np.full((9, 96 + 5), np.nan, np.float32)
    lib = abi.cpu_library()
    status = lib.block_dequantize_status(abi.WEIGHT_FORMAT_CODE[name], 96, 9, raw.ctypes.data, out.ctypes.data, 101)
    assert status == abi.TDA_OK
    np.testing.assert_array_equal(out[:, :96].view(np.uint32), ref.astype(np.float32).view(np.uint32))
    assert np.isnan(out[:, 96:]).all()


def test_block_bytes_match_contract():
    lib = abi.cpu_library()
    for name, fmt in contract.BLOCK_FORMATS.items():
        assert lib.block_bytes(abi.WEIGHT_FORMAT_CODE[name]) == fmt.block_bytes
    assert lib.block_bytes(abi.WEIGHT_FORMAT_CODE["dtype"]) == 0 and lib.block_bytes(99) == 0


def test_bad_arguments():
    lib = abi.cpu_library()
    x = torch.zeros(2, 64)
    y = torch.zeros(2, 5)
    wb = torch.zeros(5, 2 * 18, dtype=torch.uint8)

    def status(**kw):
        base = dict(weight_format=abi.WEIGHT_FORMAT_CODE["q4_0"], m=2, n=5, k=64, n_begin=0, n_end=5, ldx=64, ldy=5,
                    x=x.data_ptr(), weight=wb.data_ptr(), y=y.data_ptr())
        return lib.call_status("tda_block_linear", abi.BlockLinearArgs(**{**base, **kw}), 0, 0)

    assert status() == abi.TDA_OK
    assert status(weight_format=0) == 2 and status(weight_format=4) == 2  # TDA_ERR_BAD_DTYPE
    assert status(m=-1) == 5                                                 # TDA_ERR_BAD_BATCH
    for bad in (dict(k=48), dict(k=0, ldx=0), dict(n=0, n_end=0), dict(n_begin=3, n_end=2), dict(n_end=6),
                dict(n_begin=-1), dict(ldx=63), dict(ldy=4), dict(m=0, k=40)):
        assert status(**bad) == 4, bad                                      # TDA_ERR_BAD_SIZE, even at M = 0
    assert status(x=None) == 1 and status(weight=None) == 1 and status(y=None) == 1
    assert status(x=x.data_ptr() + 2) == 6 and status(y=y.data_ptr() + 1) == 6
    assert status(n_begin=2, n_end=2, x=None) == abi.TDA_OK  # an empty range reads nothing
    assert lib._lib.tda_block_linear(None, None, 0, None) == 1
    assert "n_begin" in lib.status_string(4)
    # tda_block_dequantize
    out = np.zeros((2, 64), np.float32)
    q = abi.WEIGHT_FORMAT_CODE["q4_0"]
    assert lib.block_dequantize_status(q, 64, 2, wb.data_ptr(), out.ctypes.data, 64) == abi.TDA_OK
    assert lib.block_dequantize_status(0, 64, 2, wb.data_ptr(), out.ctypes.data, 64) == 2
    assert lib.block_dequantize_status(q, 40, 2, wb.data_ptr(), out.ctypes.data, 64) == 4
    assert lib.block_dequantize_status(q, 64, -1, wb.data_ptr(), out.ctypes.data, 64) == 4
    assert lib.block_dequantize_status(q, 64, 2, wb.data_ptr(), out.ctypes.data, 32) == 4
    assert lib.block_dequantize_status(q, 64, 2, 0, out.ctypes.data, 64) == 1
    assert lib.block_dequantize_status(q, 64, 2, wb.data_ptr(), out.ctypes.data + 2, 64) == 6
