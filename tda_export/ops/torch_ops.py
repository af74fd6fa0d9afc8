"""torch custom ops `tda::sparse_gated_mlp` and `tda::select_active` in plain torch (any device).

Names, argument order and attribute defaults are read from contract.py, so the
torch signature cannot drift from the ONNX function or the plugins. The decode
path gathers only the active neurons' rows (as a kernel would), so weights of
inactive neurons are never read.
"""
from __future__ import annotations

import torch

from .contract import NORM_FLOOR, SELECT_ACTIVE, SPARSE_GATED_MLP, OpSpec, down_format
from .torch_blocks import check_weights, dequantize, quantize_x

_TORCH_TYPES = {"string": "str", "int": "int", "float": "float"}


def _schema(op: OpSpec) -> str:
    args = [f"Tensor {t.name}" for t in op.inputs]
    args += [f"{_TORCH_TYPES[a.type]} {a.name}={a.default!r}".replace("'", '"') for a in op.attributes]
    outs = ", ".join("Tensor" for _ in op.outputs)
    return f"({', '.join(args)}) -> ({outs})"


def activation(name: str, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """act(x); inplace: into x itself (no temporary, for callers that may not allocate)."""
    F = torch.nn.functional
    if name == "silu":
        return F.silu(x, inplace=inplace)
    if name in ("gelu_tanh", "gelu"):
        approximate = "tanh" if name == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_(x, approximate=approximate) if inplace else F.gelu(x, approximate=approximate)
    if name == "relu":
        return torch.relu_(x) if inplace else torch.relu(x)
    raise ValueError(f"activation {name!r} not in {SPARSE_GATED_MLP.attr('activation').choices}")


def _intermediate(hidden: torch.Tensor, gate_up: torch.Tensor, act: str, x_format: str = "dtype") -> torch.Tensor:
    """z in float32 (the contract accumulates in float32 whatever T is); x_format q8_0: gate/up read the
    fake-quantized xq (X_QUANT_SEMANTICS), the same float32 values an int8 dot product would take."""
    x = quantize_x(hidden) if x_format == "q8_0" else hidden.float()
    gu = x @ gate_up.float().flatten(0, 1).T  # [..., 2I], neuron-major pairs
    gu = gu.unflatten(-1, (-1, 2))
    return activation(act, gu[..., 0]) * gu[..., 1]


def _sparse_gated_mlp(hidden_states, gate_up_weight, down_weight_t, active_idx, active_count, token_valid,
                      scores_in, activation="silu", score_norm="token_l2", weight_format="dtype",
                      down_weight_format="same", x_format="dtype"):
    SPARSE_GATED_MLP.check_attrs({"activation": activation, "score_norm": score_norm, "weight_format": weight_format,
                                  "down_weight_format": down_weight_format, "x_format": x_format})
    check_weights(hidden_states, gate_up_weight, down_weight_t, weight_format, down_weight_format, x_format)
    dtype = hidden_states.dtype
    # block weights: the float op on their exact float32 values; decode dequantizes only the active rows
    def as_float(fmt):
        return (lambda w: w) if fmt == "dtype" else (lambda w: dequantize(fmt, w))
    weights, down_weights = as_float(weight_format), as_float(down_format(weight_format, down_weight_format))
    if hidden_states.shape[1] > 1:
        gate_up_weight, down_weight_t = weights(gate_up_weight), down_weights(down_weight_t)
        z = _intermediate(hidden_states, gate_up_weight, activation, x_format)  # [B, S, I]
        sq = z * z
        if score_norm == "token_l2":
            sq = sq / sq.sum(-1, keepdim=True).clamp_min(NORM_FLOOR)
        scores_out = scores_in + (sq * token_valid.float()[..., None]).sum(1)
        out = (z.to(dtype).float() @ down_weight_t.float()).to(dtype)
        return out, scores_out
    rows = []
    for b in range(hidden_states.shape[0]):  # counts differ per sequence
        idx = active_idx[b, : int(active_count[b])].long()
        z = _intermediate(hidden_states[b], weights(gate_up_weight[idx]), activation, x_format)  # [1, n]
        rows.append(z.to(dtype).float() @ down_weights(down_weight_t[idx]).float())
    out = torch.stack(rows).to(dtype) if rows else hidden_states.new_zeros(hidden_states.shape)  # batch 0
    return out, scores_in.clone()


def clamp_counts(count: torch.Tensor, inter: int, density_bounds: torch.Tensor) -> torch.Tensor:
    """The contract's k = max(n_lo, min(count, n_hi)), from float32 products lo*I and hi*I."""
    scaled = density_bounds.float() * torch.tensor(float(inter), dtype=torch.float32)
    n_lo = scaled[0].ceil().clamp(0, inter).long()
    n_hi = scaled[1].floor().clamp(0, inter).long()
    return torch.maximum(n_lo, torch.minimum(count, n_hi))


def rank_of(scores: torch.Tensor) -> torch.Tensor:
    """Position of each neuron in the contract's rank order (descending score, ties by ascending index)."""
    order = torch.sort(scores + 0.0, dim=-1, descending=True, stable=True).indices  # + 0.0: -0 -> +0
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


def _select_active(scores, threshold, density_bounds):
    scores = scores.float()
    tau = threshold.float()
    inter = scores.shape[-1]
    m = scores.amax(-1, keepdim=True) if inter else torch.zeros_like(scores[:, :1])
    passes = (scores >= (tau * tau) * m) | (tau <= 0)
    k = clamp_counts(passes.sum(-1), inter, density_bounds)
    keep = (rank_of(scores) < k[:, None]) | (m == 0)
    count = keep.sum(-1)
    # a stable sort of "not kept" puts kept neurons first, in ascending index order
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    slot = torch.arange(inter, device=scores.device)
    idx = torch.where(slot < count[:, None], order, 0)
    return idx.to(torch.int32), count.to(torch.int32)


def mask_from_state(active_idx: torch.Tensor, active_count: torch.Tensor, inter: int) -> torch.Tensor:
    """Dense bool mask [B, I] from the index-list state (padding entries never mark neuron 0)."""
    slot = torch.arange(active_idx.shape[-1], device=active_idx.device)
    keep = slot < active_count[:, None].long()
    mask = torch.zeros(active_idx.shape[0], inter + 1, dtype=torch.bool, device=active_idx.device)
    mask.scatter_(1, torch.where(keep, active_idx.long(), inter), True)  # padding goes to a spare column I
    return mask[:, :inter]


def _define(op: OpSpec, impl, fake):
    lib_op = torch.library.custom_op(f"tda::{op.torch_name}", impl, mutates_args=(), schema=_schema(op))
    lib_op.register_fake(fake)
    return lib_op


def _fake_sparse_gated_mlp(hidden_states, gate_up_weight, down_weight_t, active_idx, active_count, token_valid,
                           scores_in, activation="silu", score_norm="token_l2", weight_format="dtype",
                           down_weight_format="same", x_format="dtype"):
    check_weights(hidden_states, gate_up_weight, down_weight_t, weight_format, down_weight_format, x_format)
    return torch.empty_like(hidden_states), torch.empty_like(scores_in)


def _fake_select_active(scores, threshold, density_bounds):
    return (torch.empty(scores.shape, dtype=torch.int32, device=scores.device),
            torch.empty(scores.shape[:1], dtype=torch.int32, device=scores.device))


sparse_gated_mlp = _define(SPARSE_GATED_MLP, _sparse_gated_mlp, _fake_sparse_gated_mlp)
select_active = _define(SELECT_ACTIVE, _select_active, _fake_select_active)
