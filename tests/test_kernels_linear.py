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


# ---- x_format q8_0: each row of x quantized per block of 32 along K (contract X_QUANT_SEMANTICS) ----

def _check_q8(y, x, wd, n_begin=0, n_end=None):
    """_check against blocks.quantize_x(x) (the float64 product of the same quantized x and weights)."""
    _check(y, torch.from_numpy(blocks.quantize_x(x.numpy())), wd, n_begin, n_end)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_linear_x_q8_0_matches_fp64_reference(monkeypatch, isa, name):
    """M = 0/1/3/5 (tiles of 4/2/1 rows of x per weight tile), odd N, K = 32 to 1536, and prefill sizes past the
    64 rows quantized at a time; far from the product of x itself (x_format is read)."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for n, k in SHAPES:
        for m in (0, 1, 3, 5):
            x, wb, wd = _problem(name, m, n, k, zlib.crc32(f"q8{name}{n}{k}{m}".encode()))
            status, y = testing.run_block_linear(x, wb, name, x_format="q8_0")
            assert status == abi.TDA_OK
            _check_q8(y, x, wd)
    for m in (33, 64, 65, 130):
        x, wb, wd = _problem(name, m, 37, 192, m)
        status, y = testing.run_block_linear(x, wb, name, x_format="q8_0")
        assert status == abi.TDA_OK
        _check_q8(y, x, wd)
    x, wb, wd = _problem(name, 4, 13, 576, 5)
    status, y = testing.run_block_linear(x, wb, name, x_format="q8_0")
    with pytest.raises(AssertionError):
        _check(y, x, wd)
    # Arbitrary bytes: every nibble, and q8_0's -128 (which the integer products read as |w| = 128).
    wb = testing.random_blocks(name, 37, 576, "cpu", 1, 1.0)
    if name == "q8_0":
        assert (wb.numpy().reshape(37, -1, 34)[:, :, 2:] == 128).any()
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((5, 576)).astype(np.float32))
    status, y = testing.run_block_linear(x, wb, name, x_format="q8_0")
    assert status == abi.TDA_OK
    _check_q8(y, x, blocks.dequantize(name, wb.numpy()))


def _identity_blocks(name: str, k: int) -> np.ndarray:
    """uint8 [K, K/32 * block_bytes]: the K x K identity in `name`, scale 1 (and minimum 0), so row n of
    x . W^T is d * q of x's element n, the only nonzero product (q4_0 stores w + 8)."""
    bb = contract.BLOCK_FORMATS[name].block_bytes
    w = np.zeros((k, k // 32, bb), np.uint8)
    w[:, :, :2] = np.array([1.0], "<f2").view(np.uint8)
    if name == "q8_0":
        for n in range(k):
            w[n, n // 32, 2 + n % 32] = 1
    else:
        qs = 4 if name == "q4_1" else 2
        fill = 0x88 if name == "q4_0" else 0
        w[:, :, qs:] = fill
        for n in range(k):
            i = n % 32
            w[n, n // 32, qs + i % 16] += (1 << 4) if i >= 16 else 1
    return w.reshape(k, -1)


TIES = np.r_[127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 125.5, -125.5, np.zeros(23)]  # d = 1: x * (1/d) = x


def _x_edge_rows(k: int) -> np.ndarray:
    """Rows of x hitting the quantizer's corner cases: x * (1/d) at exact halves (round half to even, both
    signs; row 0 starts with TIES), zero and -0 blocks, one nonzero value, huge and tiny (normal d) scales,
    random blocks of many scales, a row of subnormal and barely normal scales, and last three rows with a NaN / inf / -inf (their rows of y are NaN)."""
    rng = np.random.default_rng(11)
    edge = [TIES, np.r_[127.0, np.arange(31) - 15.5], np.r_[-127.0, -(np.arange(31) - 15.5)], np.zeros(32),
            np.full(32, -0.0), np.r_[np.zeros(31), 3e-3], np.full(32, 7.25), rng.standard_normal(32) * 3e37,
            rng.standard_normal(32) * 1e-30, rng.integers(-127, 128, 32) * 2.0 ** -20]
    rows = [np.concatenate([edge[(7 * r + j) % len(edge)] if (r + j) % 3 != 2 else
                            rng.standard_normal(32) * 10.0 ** rng.uniform(-6, 6) for j in range(k // 32)])
            for r in range(7)]
    # subnormal scales (max|x| / 127 below 2^-126: flushed to a zero block) next to the smallest normal one
    rows.append(np.concatenate([np.linspace(-1, 1, 32) * f for f in (1e-40, 1e-37, 1.5e-36)][:k // 32]
                               + [np.zeros(k - 96)] * (k > 96)))
    for bad in (np.nan, np.inf, -np.inf):
        rows.append(rng.standard_normal(k))
        rows[-1][k // 2] = bad
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_linear_x_q8_0_quantizes_bit_for_bit(monkeypatch, isa, name):
    """Through identity weights y is quantize_x(x) exactly (one product d * q per element, the rest exact
    zeros): every variant quantizes x bit for bit as ops/blocks.py (decode shares the same quantizers), and a
    block with NaN/inf makes its whole row NaN (d = NaN times every weight), the other rows untouched."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    k = 96
    w = _identity_blocks(name, k)
    np.testing.assert_array_equal(blocks.dequantize(name, w), np.eye(k, dtype=np.float32))
    x = _x_edge_rows(k)
    status, y = testing.run_block_linear(torch.from_numpy(x), torch.from_numpy(w), name, x_format="q8_0")
    assert status == abi.TDA_OK
    want = blocks.quantize_x(x)
    want[~np.isfinite(x).all(1)] = np.nan
    np.testing.assert_array_equal(y.numpy(), want)
    q, d = blocks.x_q8_0(x[:7])
    np.testing.assert_array_equal(y.numpy()[:7], q * np.repeat(d, 32, axis=1))
    assert q[0, :9].tolist() == [127, 0, 0, 2, -2, 2, -2, 126, -126]  # the halves went to even


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_linear_x_q8_0_non_finite_rows(monkeypatch, isa, name):
    """A row of x with an inf/NaN block gives a NaN row of y over [n_begin, n_end); the other rows keep the bits
    of the call without it."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    x, wb, wd = _problem(name, 5, 37, 160, 21)
    status, clean = testing.run_block_linear(x, wb, name, x_format="q8_0")
    assert status == abi.TDA_OK
    x[1, 33], x[4, 159] = float("nan"), float("inf")
    for n_begin, n_end in ((0, 37), (3, 17)):
        status, y = testing.run_block_linear(x, wb, name, n_begin, n_end, x_format="q8_0")
        assert status == abi.TDA_OK
        assert torch.isnan(y[[1, 4], n_begin:n_end]).all() and torch.isfinite(clean).all()
        np.testing.assert_array_equal(y[[0, 2, 3], n_begin:n_end].numpy(), clean[[0, 2, 3], n_begin:n_end].numpy())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMATS)
def test_linear_x_q8_0_row_ranges_split_exactly(monkeypatch, isa, name):
    """As test_row_ranges_split_exactly with x_format q8_0: splits of [0, N) give the full call's bits, strided x
    and y are honoured, and M past one chunk of quantized rows (64) gives the bits of smaller calls."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    for m in (1, 3, 5):
        x, wb, wd = _problem(name, m, 45, 96, 17 + m)
        status, full = testing.run_block_linear(x, wb, name, x_format="q8_0")
        assert status == abi.TDA_OK
        for n_begin, n_end in ((0, 1), (3, 17), (17, 45), (44, 45), (5, 5)):
            status, part = testing.run_block_linear(x, wb, name, n_begin, n_end, x_format="q8_0")
            assert status == abi.TDA_OK
            _check_q8(part, x, wd, n_begin, n_end)
            np.testing.assert_array_equal(part[:, n_begin:n_end].numpy(), full[:, n_begin:n_end].numpy())
        wide = torch.full((m, 96 + 11), float("nan"))
        wide[:, :96] = x
        y = torch.full((m, 45 + 3), float("nan"))
        status, _ = testing.run_block_linear(wide[:, :96], wb, name, out=y[:, :45], x_format="q8_0")
        assert status == abi.TDA_OK
        np.testing.assert_array_equal(y[:, :45].numpy(), full.numpy())
        assert torch.isnan(y[:, 45:]).all()
    x, wb, _ = _problem(name, 70, 13, 64, 2)
    _, full = testing.run_block_linear(x, wb, name, x_format="q8_0")
    for rows in (slice(0, 1), slice(64, 70), slice(3, 5)):
        _, part = testing.run_block_linear(x[rows].contiguous(), wb, name, x_format="q8_0")
        np.testing.assert_array_equal(part.numpy(), full[rows].numpy())


@pytest.mark.parametrize("name", FORMATS)
def test_linear_x_q8_0_isas_agree(monkeypatch, name):
    x, wb, wd = _problem(name, 4, 37, 576, 3)
    outs = []
    for isa in ISAS:
        monkeypatch.setenv("TDA_CPU_ISA", isa) if isa != "best" else monkeypatch.delenv("TDA_CPU_ISA", raising=False)
        status, y = testing.run_block_linear(x, wb, name, x_format="q8_0")
        assert status == abi.TDA_OK
        outs.append(y.numpy())
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-4, atol=1e-4)


def test_linear_x_format_arguments():
    """x_format 0 or 1 (the block linear always has block weights); 2 or -1: TDA_ERR_BAD_DTYPE, even at M = 0,
    and the workspace stays 0."""
    lib = abi.cpu_library()
    x, y = torch.zeros(2, 64), torch.zeros(2, 5)
    wb = torch.zeros(5, 2 * 18, dtype=torch.uint8)

    def args(**kw):
        base = dict(weight_format=abi.WEIGHT_FORMAT_CODE["q4_0"], m=2, n=5, k=64, n_begin=0, n_end=5, ldx=64, ldy=5,
                    x=x.data_ptr(), weight=wb.data_ptr(), y=y.data_ptr())
        return abi.BlockLinearArgs(**{**base, **kw})

    assert lib.call_status("tda_block_linear", args(x_format=1), 0, 0) == abi.TDA_OK
    assert lib.call_status("tda_block_linear", args(x_format=1, m=0, x=None), 0, 0) == abi.TDA_OK
    for bad in (2, -1):
        for kw in ({}, dict(m=0), dict(n_begin=2, n_end=2)):
            assert lib.call_status("tda_block_linear", args(x_format=bad, **kw), 0, 0) == 2, (bad, kw)
        assert lib.workspace_size("tda_block_linear", args(x_format=bad)) == 0
    assert lib.call_status("tda_block_linear", args(x_format=1, weight_format=0), 0, 0) == 2
    y.fill_(float("nan"))
    status, _ = testing.run_block_linear(x, wb, "q4_0", out=y, x_format=2)
    assert status == 2 and torch.isnan(y).all()
