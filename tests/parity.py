"""Run an exported graph in ONNX Runtime and, as the reference, the HF model itself with its MLPs
replaced by tda::sparse_gated_mlp (dense prompt collecting scores, then decode with masks from
reference.select_active at the same thresholds and density bounds)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from tda_export import arch
from tda_export.calibration import Calibration
from tda_export.ops import reference
from tda_export.ops.torch_ops import sparse_gated_mlp
from tda_export.ops.torch_blocks import quantize_x


class _State:
    def __init__(self):
        self.scores = self.idx = self.count = self.token_valid = None


class _TDAMLP(torch.nn.Module):
    def __init__(self, mlp, activation, state, x_format="dtype"):
        super().__init__()
        self.x_format = x_format  # "q8_0": gate/up read the contract's quantized x (ops/torch_blocks.quantize_x)
        self.gate_up = torch.stack([mlp.gate_proj.weight, mlp.up_proj.weight], 1).detach().float()
        self.down_t = mlp.down_proj.weight.T.detach().float().contiguous()
        self.activation, self.state = activation, state

    def forward(self, x):
        st = self.state
        h = quantize_x(x.float()) if self.x_format == "q8_0" else x.float()
        out, st.scores = sparse_gated_mlp(h, self.gate_up, self.down_t, st.idx, st.count, st.token_valid,
                                          st.scores, activation=self.activation)
        return out.to(x.dtype)


def prompt(batch_lens, vocab, seed=0):
    """Left-padded prompts: input_ids, attention_mask, position_ids (HF convention: pads at position 1)."""
    rng = np.random.default_rng(seed)
    total = max(batch_lens)
    ids = rng.integers(3, vocab, size=(len(batch_lens), total)).astype(np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(batch_lens):
        mask[b, total - n:] = 1
        ids[b, : total - n] = 0
    pos = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    return ids, mask, pos


def reference_run(model, activation, thresholds, ids, mask, pos, steps, bounds=None, x_format="dtype"):
    """[(logits [B,S,V], [(active_idx, active_count, scores)] per layer)] for the prompt and each decode step;
    bounds: per-layer SelectActive density_bounds (None: no clamp); x_format "q8_0": the MLP's gate/up read the
    quantized x (the model's other block linears need export/engine_weights.apply(..., x="q8_0") hooks)."""
    layers = arch.decoder_layers(model)
    states = [_State() for _ in layers]
    originals = [l.mlp for l in layers]
    for l, st in zip(layers, states):
        l.mlp = _TDAMLP(l.mlp, activation, st, x_format)
    B, I = ids.shape[0], arch.text_config(model.config).intermediate_size
    try:
        for st in states:
            st.scores = torch.zeros(B, I)
            st.idx = torch.zeros(B, I, dtype=torch.int32)
            st.count = torch.zeros(B, dtype=torch.int32)
        results, cache = [], None
        ids_t, mask_t, pos_t = map(torch.from_numpy, (ids, mask, pos))
        for step in range(steps + 1):
            for st in states:
                st.token_valid = mask_t[:, -ids_t.shape[1]:].float()
            with torch.no_grad():
                out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t, cache=cache,
                            use_cache=True)
            cache = out.past_key_values
            for n, (st, tau) in enumerate(zip(states, thresholds)):
                idx, cnt = reference.select_active(st.scores.numpy(), tau, (0.0, 1.0) if bounds is None else bounds[n])
                st.idx, st.count = torch.from_numpy(idx), torch.from_numpy(cnt)
            results.append((out.logits.float().numpy(),
                            [(s.idx.numpy(), s.count.numpy(), s.scores.numpy()) for s in states]))
            ids_t = out.logits[:, -1].argmax(-1, keepdim=True)
            mask_t = torch.cat([mask_t, torch.ones_like(ids_t)], 1)
            pos_t = pos_t[:, -1:] + 1
        return results
    finally:
        for l, m in zip(layers, originals):
            l.mlp = m


def onnx_run(path, ids, mask, pos, steps, tokens_from):
    """The same loop in ORT, feeding the reference's chosen tokens so both see identical inputs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    B = ids.shape[0]
    for i in sess.get_inputs():
        if i.name.startswith(("past_key_values", "past_tda")):
            shape = [B if d == "batch" else 0 if d == "past_sequence" else d for d in i.shape]
            dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32}[i.type]
            feeds[i.name] = np.zeros(shape, dtype)
    names = [o.name for o in sess.get_outputs()]
    results = []
    for step in range(steps + 1):
        out = dict(zip(names, sess.run(None, feeds)))
        results.append(out)
        nxt = tokens_from[step][0][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = {k: out[k.replace("past_key_values", "present").replace("past_tda", "present_tda")]
                 for k in feeds if k.startswith("past")}
        feeds.update(input_ids=nxt, attention_mask=np.concatenate([mask, np.ones((B, step + 1), np.int64)], 1),
                     position_ids=pos[:, -1:] + step + 1)
    return results


def half_density_thresholds(model, activation, ids, mask, pos) -> list[float]:
    """Per-layer tau keeping about half the neurons of sequence 0: the median of sqrt(s / max s)."""
    ((_, state),) = reference_run(model, activation, [0.0] * 1000, ids, mask, pos, 0)
    return [float(np.median(np.sqrt(scores[0] / scores[0].max()))) for _, _, scores in state]


def write_calibration(path, loaded, thresholds) -> None:
    c = loaded.config
    Calibration(model=loaded.name, fingerprint=loaded.fingerprint(), num_layers=c.num_hidden_layers,
                intermediate_size=c.intermediate_size, score_norm="token_l2", text={},
                thresholds={"0.50": thresholds},
                default={"kind": "density", "densities": [0.5] * c.num_hidden_layers,
                         "thresholds": thresholds}).save(path)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
