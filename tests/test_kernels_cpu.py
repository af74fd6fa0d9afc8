"""Kernel library semantics against the float64 reference.

The test bodies take a `device` fixture; tests/test_kernels_gpu.py reruns the
same bodies with device="cuda", so both libraries meet one set of checks.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from tda_export.kernels import abi, testing
from tda_export.kernels import torch_ops as K
from tda_export.ops import reference
from tda_export.ops.contract import ACTIVATIONS, SCORE_NORMS
from op_cases import bound_cases

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Multiples of 8 but not of 64 (tails of every vector loop), and a real shape.
SHAPES = ((40, 72), (64, 128), (576, 1536))


@pytest.fixture
def device():
    return "cpu"


def _masks(kinds, inter, seed):
    rng = np.random.default_rng(seed)
    return [testing.make_mask(k, inter, rng, density=rng.uniform(0.05, 0.9)) for k in kinds]


def _check_decode(device, dtype, hidden, inter, kinds, activation="silu", seed=0, deterministic=True):
    x, gu, wd, idx, cnt = testing.decode_problem(len(kinds), hidden, inter, dtype, _masks(kinds, inter, seed), seed,
                                                 device)
    status, out = testing.run_decode(x, gu, wd, idx, cnt, activation, deterministic)
    assert status == abi.TDA_OK
    ref = testing.decode_reference(x, gu, wd, idx, cnt, activation)
    for b, kind in enumerate(kinds):
        if kind == "empty":
            assert torch.all(out[b] == 0), "empty mask must give an exact zero row"
    err = testing.rel_error(out, ref)
    assert err < testing.TOLERANCE[dtype], (err, dtype, hidden, inter, kinds)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("kind", testing.MASK_KINDS)
def test_decode_batch1_masks(device, dtype, hidden, inter, kind):
    _check_decode(device, dtype, hidden, inter, [kind], seed=zlib.crc32(f"{hidden}-{kind}".encode()) % 1000)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_decode_activations(device, activation):
    _check_decode(device, torch.float32, 40, 72, ["random", "full", "single"], activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [2, 3, 8, 17, 64])
def test_decode_batch_independent_masks(device, dtype, batch):
    kinds = [testing.MASK_KINDS[(b * 5 + 3) % len(testing.MASK_KINDS)] for b in range(batch)]
    _check_decode(device, dtype, 40, 72, kinds, seed=batch)
    _check_decode(device, dtype, 128, 256, ["random"] * batch, seed=batch + 1)


def test_decode_batch_rows_match_single_calls(device):
    """Each sequence of a batch sees only its own mask."""
    kinds = ["random", "single", "full", "empty", "random"]
    x, gu, wd, idx, cnt = testing.decode_problem(5, 40, 72, torch.float32, _masks(kinds, 72, 3), 3, device)
    _, batched = testing.run_decode(x, gu, wd, idx, cnt)
    for b in range(5):
        status, single = testing.run_decode(x[b:b + 1], gu, wd, idx[b:b + 1], cnt[b:b + 1])
        assert status == abi.TDA_OK
        torch.testing.assert_close(batched[b:b + 1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deterministic", [True, False])
def test_decode_deterministic_flag(device, deterministic):
    x, gu, wd, idx, cnt = testing.decode_problem(4, 256, 512, torch.float32, _masks(["full", "random"] * 2, 512, 4),
                                                 4, device)
    outs = [testing.run_decode(x, gu, wd, idx, cnt, deterministic=deterministic)[1] for _ in range(3)]
    ref = testing.decode_reference(x, gu, wd, idx, cnt)
    assert all(testing.rel_error(o, ref) < 1e-5 for o in outs)
    if deterministic:
        assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_decode_torch_op(device):
    x, gu, wd, idx, cnt = testing.decode_problem(3, 40, 72, torch.bfloat16, _masks(["random"] * 3, 72, 5), 5, device)
    out = K.sparse_gated_mlp_decode(x[:, None], gu, wd, idx, cnt, "gelu_tanh")
    assert out.shape == (3, 1, 40) and out.dtype == torch.bfloat16
    ref = testing.decode_reference(x, gu, wd, idx, cnt, "gelu_tanh")
    assert testing.rel_error(out[:, 0], ref) < testing.TOLERANCE[torch.bfloat16]


def test_decode_bad_arguments(device):
    x, gu, wd, idx, cnt = testing.decode_problem(2, 40, 72, torch.float32, _masks(["full", "random"], 72, 6), 6,
                                                 device)
    assert testing.run_decode(x, gu, wd, idx, cnt, hidden=36)[0] == 4  # TDA_ERR_BAD_SIZE
    assert testing.run_decode(x, gu, wd, idx, cnt, hidden=0)[0] == 4
    assert testing.run_decode(x, gu, wd, idx, cnt, workspace_bytes=8)[0] == 7  # TDA_ERR_WORKSPACE_TOO_SMALL
    out = torch.empty(2 * 40 + 1, dtype=torch.float32, device=device)[1:].view(2, 40)
    assert testing.run_decode(x, gu, wd, idx, cnt, out=out)[0] == 6  # TDA_ERR_MISALIGNED
    gu_bad = torch.randn(76, 2, 40, device=device)  # I = 76: not a multiple of 8
    idx_bad = torch.zeros(2, 76, dtype=torch.int32, device=device)
    assert testing.run_decode(x, gu_bad, wd, idx_bad, cnt)[0] == 4
    with pytest.raises(abi.KernelError, match="multiple of 8"):
        K.sparse_gated_mlp_decode(x[:, :36].contiguous(), gu[:, :, :36].contiguous(), wd[:, :36].contiguous(), idx,
                                  cnt)
    lib = testing.library_for(device)
    args = abi.DecodeArgs(dtype=1, activation=9, batch=1, hidden=8, intermediate=8)
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 3  # TDA_ERR_BAD_ENUM
    args = abi.DecodeArgs(dtype=7, activation=0, batch=1, hidden=8, intermediate=8)
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 2  # TDA_ERR_BAD_DTYPE
    args = abi.DecodeArgs(dtype=0, activation=0, batch=65, hidden=8, intermediate=8)
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == 5  # TDA_ERR_BAD_BATCH
    assert lib.status_string(4).startswith("hidden/intermediate size")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
def test_decode_batch_zero(device, dtype, deterministic):
    """Batch 0 is legal: workspace query 0 (it once divided by zero), OK status, no pointer read."""
    lib = testing.library_for(device)
    args = abi.DecodeArgs(dtype=abi.DTYPE_CODE[str(dtype).removeprefix("torch.")], activation=0, batch=0,
                          hidden=4096, intermediate=14336, deterministic=int(deterministic))
    assert lib.workspace_size("tda_sparse_gated_mlp_decode", args) == 0
    assert lib.call_status("tda_sparse_gated_mlp_decode", args, 0, 0) == abi.TDA_OK
    x, gu, wd, idx, cnt = testing.decode_problem(0, 40, 72, dtype, [], 0, device)
    status, out = testing.run_decode(x, gu, wd, idx, cnt, deterministic=deterministic)
    assert status == abi.TDA_OK and out.shape == (0, 40)
    y = K.sparse_gated_mlp_decode(x[:, None], gu, wd, idx, cnt)
    assert y.shape == (0, 1, 40) and y.dtype == dtype and y.device == x.device


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
def test_decode_versions(device, version, batch):
    """Every decode version meets the same contract (the CPU library has one algorithm and accepts all;
    the CUDA library runs v2 for fp16/bf16 at batch 1-8 and v1 otherwise), deterministically."""
    kinds = [testing.MASK_KINDS[(b * 5 + 1) % len(testing.MASK_KINDS)] for b in range(batch)]
    for dtype in DTYPES:
        for hidden, inter in ((40, 72), (264, 1032)):  # H not a multiple of 32; I a partial 512-segment
            x, gu, wd, idx, cnt = testing.decode_problem(batch, hidden, inter, dtype, _masks(kinds, inter, batch),
                                                         batch, device)
            status, out = testing.run_decode(x, gu, wd, idx, cnt, version=version)
            assert status == abi.TDA_OK
            ref = testing.decode_reference_torch(x, gu, wd, idx, cnt)
            assert testing.rel_error(out, ref) < testing.TOLERANCE[dtype], (dtype, hidden, version)
            assert torch.equal(out, testing.run_decode(x, gu, wd, idx, cnt, version=version)[1])
    y = K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt, "silu", True, version)
    assert testing.rel_error(y, ref) < testing.TOLERANCE[dtype]


def test_decode_bad_version(device):
    x, gu, wd, idx, cnt = testing.decode_problem(1, 40, 72, torch.float32, _masks(["random"], 72, 12), 12, device)
    for version in (-1, 3):
        assert testing.run_decode(x, gu, wd, idx, cnt, version=version)[0] == 3  # TDA_ERR_BAD_ENUM
        with pytest.raises(ValueError, match="version"):
            K.sparse_gated_mlp_decode(x, gu, wd, idx, cnt, "silu", True, version)


def test_decode_workspace_alignment(device):
    x, gu, wd, idx, cnt = testing.decode_problem(2, 40, 72, torch.bfloat16, _masks(["random", "full"], 72, 9), 9,
                                                 device)
    assert testing.run_decode(x, gu, wd, idx, cnt)[0] == abi.TDA_OK
    for offset in (16, 128):  # the header asks for 256 bytes; the kernels carve float4 arrays from it
        assert testing.run_decode(x, gu, wd, idx, cnt, workspace_offset=offset)[0] == 6  # TDA_ERR_MISALIGNED
    _, ptr = K.workspace(1000, torch.device(device))
    assert ptr % abi.WORKSPACE_ALIGNMENT == 0


def test_decode_torch_op_checks_inputs(device):
    """A weight that does not match hidden_states is refused by name before any kernel reads it."""
    x, gu, wd, idx, cnt = testing.decode_problem(2, 40, 72, torch.float32, _masks(["random", "full"], 72, 10), 10,
                                                 device)
    other = "meta" if device == "cpu" else "cpu"
    bad = {
        "gate_up_weight has shape .* H=40": (x, gu[:, :, :32].contiguous(), wd, idx, cnt),
        r"down_weight_t has shape \[72, 48\]": (x, gu, torch.zeros(72, 48, device=device), idx, cnt),
        r"down_weight_t has shape \[64, 40\].* I=72": (x, gu, wd[:64].contiguous(), idx, cnt),
        "gate_up_weight is torch.bfloat16": (x, gu.bfloat16(), wd, idx, cnt),
        "down_weight_t is on": (x, gu, wd.to(other), idx, cnt),
        "active_idx has shape": (x, gu, wd, idx[:, :8].contiguous(), cnt),
        "active_count must be int32 or int64": (x, gu, wd, idx, cnt.float()),
        "hidden_states must be": (x[:, None, None], gu, wd, idx, cnt),
    }
    for message, args in bad.items():
        with pytest.raises((ValueError, TypeError), match=message):
            K.sparse_gated_mlp_decode(*args)


def test_decode_fake_matches_real_layout(device):
    """The fake kernel returns what the real op does: a contiguous [B, H] of x's dtype, whatever x's strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, gu, wd, idx, cnt = testing.decode_problem(3, 40, 72, torch.float32, _masks(["random"] * 3, 72, 11), 11,
                                                 device)
    x_t = x.t().contiguous().t()  # same values, column-major strides
    real = K.sparse_gated_mlp_decode(x_t, gu, wd, idx, cnt)
    with FakeTensorMode() as mode:
        fake = K.sparse_gated_mlp_decode(*(mode.from_tensor(t) for t in (x_t, gu, wd, idx, cnt)))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.is_contiguous()
    assert fake.dtype == real.dtype
    torch.library.opcheck(K.sparse_gated_mlp_decode, (x_t, gu, wd, idx, cnt), test_utils=("test_faketensor",))


def _check_select(device, scores: np.ndarray, tau: float, bounds=None):
    s = torch.from_numpy(scores.astype(np.float32)).to(device)
    b = None if bounds is None else torch.tensor(bounds, dtype=torch.float32, device=device)
    idx, cnt = K.select_active(s, torch.tensor(tau, device=device), b)
    ref_idx, ref_cnt = reference.select_active(scores, tau, (0.0, 1.0) if bounds is None else bounds)
    np.testing.assert_array_equal(cnt.cpu().numpy(), ref_cnt, err_msg=f"tau={tau} bounds={bounds}")
    np.testing.assert_array_equal(idx.cpu().numpy(), ref_idx, err_msg=f"tau={tau} bounds={bounds}")


def test_select_active_clamp_cases(device):
    for scores, tau, bounds in bound_cases(np.random.default_rng(5)):
        _check_select(device, scores, tau, bounds)


@pytest.mark.parametrize("inter", [13, 1536, 14336])
@pytest.mark.parametrize("tau,bounds", [(0.9, (0.45, 0.55)), (0.05, (0.45, 0.55)), (0.3, (0.1, 0.2)),
                                        (0.3, (0.5, 0.5)), (0.0, (0.0, 0.0))])
def test_select_active_clamp_wide(device, inter, tau, bounds):
    """Wide rows (several block rounds on the GPU), many ties across the k-th score, negative scores."""
    rng = np.random.default_rng(inter)
    scores = rng.gamma(0.3, size=(4, inter)).astype(np.float32)
    scores[1] = np.round(scores[1] * 4) / 4            # heavy ties
    scores[2] = -scores[2]                             # all negative: max < 0
    scores[3, : inter // 2] = 0.0                      # half zero (ties at the bottom)
    _check_select(device, scores, tau, bounds)


@pytest.mark.parametrize("inter", [1, 13, 72, 1536, 14336])
@pytest.mark.parametrize("tau", [-0.5, 0.0, 0.1, 0.3, 0.7, 1.0, 1.5])
def test_select_active(device, inter, tau):
    rng = np.random.default_rng(inter)
    scores = rng.gamma(0.3, size=(3, inter)).astype(np.float32)
    scores[1] = 0.0                                  # no valid prompt token: dense fallback
    scores[2, rng.integers(inter, size=3)] = scores[2].max()  # ties with the max
    _check_select(device, scores, tau)


def test_select_active_boundary_is_exact(device):
    """scores == (tau*tau)*m in float32 must be active (>=), one ulp below not."""
    tau = np.float32(0.3)
    m = np.float32(7.0)
    cut = (tau * tau) * m
    below = np.nextafter(cut, np.float32(0))
    scores = np.array([[m, cut, below, 0.0, cut, m, below, 1.0]], np.float32)
    _check_select(device, scores, float(tau))


def test_select_active_poisoned_outputs(device):
    lib = testing.library_for(device)
    scores = torch.rand(4, 40, device=device) + 0.01
    tau = torch.tensor(0.9, device=device)
    idx = torch.full((4, 40), -7, dtype=torch.int32, device=device)
    cnt = torch.full((4,), -7, dtype=torch.int32, device=device)
    args = abi.SelectArgs(batch=4, intermediate=40, scores=scores.data_ptr(), threshold=tau.data_ptr(),
                          active_idx=idx.data_ptr(), active_count=cnt.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    lib.call("tda_select_active", args, 0, 0, stream)
    ref_idx, ref_cnt = reference.select_active(scores.cpu().numpy(), 0.9)
    np.testing.assert_array_equal(idx.cpu().numpy(), ref_idx)
    np.testing.assert_array_equal(cnt.cpu().numpy(), ref_cnt)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score_norm", SCORE_NORMS)
@pytest.mark.parametrize("batch,seq,inter", [(1, 1, 8), (2, 5, 72), (3, 17, 1536)])
def test_prefill_scores(device, dtype, score_norm, batch, seq, inter):
    g = torch.Generator().manual_seed(seq)
    z = torch.randn(batch, seq, inter, generator=g).to(dtype)
    valid = (torch.rand(batch, seq, generator=g) > 0.3).float()
    valid[0, 0] = 1.0
    if seq > 2:
        z[0, 1] = 0.0  # all-zero token: NORM_FLOOR keeps it at 0 instead of 0/0
    scores_in = torch.rand(batch, inter, generator=g)
    out = K.prefill_scores(z.to(device), valid.to(device), scores_in.to(device), score_norm)
    z64 = z.to(torch.float64).numpy()
    ref = scores_in.double().numpy() + reference.prompt_scores(z64, valid.numpy(), score_norm)
    err = testing.rel_error(out, ref)
    assert err < 1e-5, err  # z is given in T, so only fp32 accumulation differs


def test_prefill_scores_in_place_and_errors(device):
    lib = testing.library_for(device)
    z = torch.randn(2, 3, 16, device=device)
    valid = torch.ones(2, 3, device=device)
    scores = torch.rand(2, 16, device=device)
    expected = K.prefill_scores(z, valid, scores, "none")
    args = abi.PrefillArgs(dtype=0, score_norm=1, batch=2, seq_len=3, intermediate=16, z=z.data_ptr(),
                           token_valid=valid.data_ptr(), scores_in=scores.data_ptr(), scores_out=scores.data_ptr())
    size = lib.workspace_size("tda_prefill_scores", args)
    _ws, ws_ptr = K.workspace(size, torch.device(device))
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    lib.call("tda_prefill_scores", args, ws_ptr, size, stream)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    assert lib.call_status("tda_prefill_scores", args, ws_ptr + 4, size, stream) == 6  # TDA_ERR_MISALIGNED
    args.intermediate = 12
    assert lib.call_status("tda_prefill_scores", args, ws_ptr, size, stream) == 4
    args.intermediate, args.score_norm = 16, 2
    assert lib.call_status("tda_prefill_scores", args, ws_ptr, size, stream) == 3


def test_torch_ops_opcheck(device):
    x, gu, wd, idx, cnt = testing.decode_problem(2, 40, 72, torch.float32, _masks(["random", "full"], 72, 7), 7,
                                                 device)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(K.sparse_gated_mlp_decode, (x, gu, wd, idx, cnt), {"activation": "relu"},
                          test_utils=checks)
    torch.library.opcheck(K.select_active, (torch.rand(2, 72, device=device), torch.tensor(0.4, device=device)),
                          test_utils=checks)
    torch.library.opcheck(K.select_active, (torch.rand(2, 72, device=device), torch.tensor(0.4, device=device),
                                            torch.tensor([0.5, 0.6], device=device)), test_utils=checks)
    torch.library.opcheck(K.prefill_scores, (torch.randn(2, 3, 72, device=device), torch.ones(2, 3, device=device),
                                             torch.zeros(2, 72, device=device)), test_utils=checks)


def test_select_active_negative_and_nan_threshold(device):
    """Edge cases follow the reference literally: max over all scores, NaN tau selects nothing."""
    scores = np.array([[-3.0, -1.0, -2.0, -1.0], [0.5, 2.0, 0.0, 1.0]], np.float32)
    _check_select(device, scores, 0.5)
    _check_select(device, scores, float("nan"))


# The CPU library picks AVX-512 / AVX2 / portable loops from CPUID per call;
# TDA_CPU_ISA caps the choice, so every variant this machine can run is
# checked (a cap above what the CPU has falls back to the best available).
@pytest.mark.parametrize("isa", ["generic", "avx2", "best"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,inter", [(40, 72), (72, 136), (576, 1536)])
def test_decode_cpu_isa_variants(monkeypatch, isa, dtype, hidden, inter):
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    _check_decode("cpu", dtype, hidden, inter, ["full"], seed=1)
    _check_decode("cpu", dtype, hidden, inter, ["random"], seed=2)
    # Batched tiles of 4/2/1 active sequences per row, all-masked rows.
    _check_decode("cpu", dtype, hidden, inter, ["random", "full", "empty", "random", "single", "random", "last"],
                  activation="gelu_tanh", seed=3)


@pytest.mark.parametrize("isa", ["generic", "avx2", "best"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_cpu_thread_count_invariant(monkeypatch, isa, batch):
    """Bitwise-equal output for 1, 2 and 3 OpenMP threads (row split for
    gate/up, column split for down)."""
    if isa != "best":
        monkeypatch.setenv("TDA_CPU_ISA", isa)
    x, gu, wd, idx, cnt = testing.decode_problem(batch, 1048, 2048, torch.float32,
                                                 _masks(["full", "random"] * batch, 2048, 8)[:batch], 8)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)  # the same libgomp as the kernel library
            outs.append(testing.run_decode(x, gu, wd, idx, cnt)[1])
    finally:
        torch.set_num_threads(before)
    assert testing.rel_error(outs[0], testing.decode_reference(x, gu, wd, idx, cnt)) < 1e-5
    assert all(torch.equal(outs[0], o) for o in outs[1:])
