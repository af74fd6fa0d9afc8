"""The exported decoder as plain torch code over a static KV cache (gpt-fast style).

Weights come from the ONNX initializers (names from export/names.py, family details from the
manifest's DecoderSpec), so this network computes what the ONNX graph computes: same folded norms,
same rotary caches, same additive masks. The MLP is a callback, so the TDA logic lives in torch_tda.py.

A block-quantized engine's weights (manifest weight_formats) are dequantized once, at load, to the contract's
exact float32 values: torch has no matmul on these blocks, and dequantizing every weight at every step would
cost far more than the float32 copy's memory; so this backend computes exactly what the engine's blocks mean,
at a float32 engine's speed and memory (the native runtime is the one that reads the blocks per token).

Cache slots are columns of the attention mask: every sequence of the batch writes token t of a call to
slot start + t (left padding keeps the rows aligned), while rotary positions skip each row's padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..export import names
from ..export.spec import DecoderSpec
from ..export.weights import TORCH_TYPES
from ..ops.contract import BLOCK_FORMATS, X_FORMATS
from ..ops.torch_blocks import dequantize, quantize_x


@dataclass
class Attention:
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor               # weights transposed, [in, out], as exported
    bias: dict[str, torch.Tensor]  # q/k/v/o -> bias, only those the model has (Qwen2: q, k, v)
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


@dataclass
class Layer:
    attn: Attention
    norms: dict[str, torch.Tensor]  # names.LAYER_NORMS entries this family has
    gate_up: torch.Tensor           # [I, 2, H]
    down_t: torch.Tensor            # [I, H]
    window: int | None
    rope: str


# mlp(layer index, normed hidden [B, S, H]) -> [B, S, H]
MLP = Callable[[int, torch.Tensor], torch.Tensor]


class TorchDecoder:
    def __init__(self, spec: DecoderSpec, weights: dict[str, torch.Tensor], device: torch.device,
                 max_batch: int, max_context: int, weight_formats: dict[str, str] | None = None,
                 x_format: str = "dtype"):
        """weight_formats: the manifest's tensor name -> format; tensors in a block format are dequantized.
        x_format: the manifest's (contract x_format): "q8_0" makes every block linear but down read its input
        through ops/torch_blocks.quantize_x, as the engine's graph and kernels do."""
        self.spec, self.device = spec, device
        if x_format not in X_FORMATS:
            raise ValueError(f"manifest x_format {x_format!r} is not one of {list(X_FORMATS)}")
        if x_format != "dtype" and not any(f in BLOCK_FORMATS for f in (weight_formats or {}).values()):
            raise ValueError(f"manifest x_format {x_format!r} needs block-format weights; this engine has none")
        self.xq = quantize_x if x_format == "q8_0" else (lambda x: x)
        formats = weight_formats or {}
        self.dtype = TORCH_TYPES[spec.dtype]
        self.max_batch, self.max_context = max_batch, max_context

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"initializer {name!r} missing from the exported model ({spec.family})")
            return weights.pop(name).to(device)  # pop: the CPU copy goes as soon as the device has it

        def optional(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        def blocks(name: str) -> bool:
            if name in weights and weights[name].dtype == torch.uint8 and formats.get(name) not in BLOCK_FORMATS:
                raise ValueError(f"initializer {name!r} is uint8 but the manifest's weight_formats gives it format "
                                 f"{formats.get(name)!r}, not one of {list(BLOCK_FORMATS)}")
            if formats.get(name) in BLOCK_FORMATS and spec.dtype != "float32":
                raise ValueError(f"{name} is {formats[name]} blocks in a {spec.dtype} engine: the torch backend runs "
                                 f"block-quantized engines built with --dtype fp32 only")
            return formats.get(name) in BLOCK_FORMATS

        def weight(name: str, blocks_name: str | None = None, transpose: bool = False) -> torch.Tensor:
            """A float weight, or the exact float32 dequantization of its blocks ([out, in] rows; transposed to
            the float engine's [in, out] where that is what the float tensor holds)."""
            blocks_name = blocks_name or name
            if not blocks(blocks_name):
                return take(name)
            w = dequantize(formats[blocks_name], take(blocks_name))
            return w.T.contiguous() if transpose else w

        self.embed = weight(names.EMBED, names.EMBED_BLOCKS)
        self.lm_head = self.embed if spec.tied_embeddings else weight(names.LM_HEAD, names.LM_HEAD_BLOCKS)
        self.final_norm = take(names.weight(names.FINAL_NORM))
        self.rope = {r: (take(names.rope(r, "cos")), take(names.rope(r, "sin"))) for r in spec.rope_types}
        norms = names.LAYER_NORMS if spec.sandwich_norms else ("input_norm", "post_attn_norm")
        self.layers = []
        for n, ls in enumerate(spec.layers):
            proj = {c: names.attn_proj(n, c) for c in "qkvo"}
            attn = Attention(*(weight(names.linear_weight_t(proj[c]), names.linear_weight_blocks(proj[c]), True)
                               for c in "qkvo"),
                             bias={c: b for c in "qkvo" if (b := optional(names.linear_bias(proj[c]))) is not None},
                             q_norm=take(names.weight(names.qk_norm(n, "q"))) if spec.qk_norm else None,
                             k_norm=take(names.weight(names.qk_norm(n, "k"))) if spec.qk_norm else None)
            self.layers.append(Layer(attn, {w: take(names.weight(names.layer_norm(n, w))) for w in norms},
                                     weight(names.gate_up(n)), weight(names.down_t(n)), ls.window, ls.rope))
        # A CUDA decode graph reads every slot of its context bucket (static shapes), and masked slots still
        # meet V in the weighted sum, so they must hold finite numbers: zeros. The CPU path reads only written slots and
        # leaves the pages of an empty() cache uncommitted until used.
        alloc = torch.zeros if device.type == "cuda" else torch.empty
        shape = (max_batch, spec.kv_heads, max_context, spec.head_dim)
        self.k_cache = [alloc(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.v_cache = [alloc(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self._neg = -0.5 * torch.finfo(self.dtype).max  # as the exporter: finite, so all-masked rows stay finite
        self._embed_scale = (torch.tensor(spec.embed_scale, dtype=self.dtype, device=device)
                             if spec.embed_scale else None)

    # ---- pieces ---------------------------------------------------------------------------
    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """ONNX RMSNormalization with stash_type float32: normalise in fp32, scale in the compute dtype."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.rms_eps)
        return y.to(x.dtype) * weight

    @staticmethod
    def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Non-interleaved (rotate-half) rotary on [B, S, heads, D] with cos/sin [B, S, 1, D/2]."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def masks(self, slots: torch.Tensor, kv_len: int, pad_mask: torch.Tensor) -> dict:
        """Additive [B, 1, S, kv_len] mask per distinct window: causal by slot, padding from pad_mask."""
        kv = torch.arange(kv_len, device=self.device)
        diff = slots[:, None] - kv[None, :]
        causal = (diff >= 0)[None, None] & pad_mask[:, None, None, :]
        out = {}
        for window in {l.window for l in self.layers}:
            allowed = causal if window is None else causal & (diff < window)
            out[window] = torch.where(allowed, torch.zeros((), dtype=self.dtype, device=self.device),
                                      torch.full((), self._neg, dtype=self.dtype, device=self.device))
        return out

    def attention(self, n: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int,
                  mask: torch.Tensor) -> torch.Tensor:
        s, layer = self.spec, self.layers[n]
        a = layer.attn
        B, S, _ = x.shape
        x = self.xq(x)
        q, k, v = (x @ w for w in (a.wq, a.wk, a.wv))
        if a.bias:
            q, k, v = (t + a.bias[c] if c in a.bias else t for t, c in ((q, "q"), (k, "k"), (v, "v")))
        q = q.view(B, S, s.heads, s.head_dim)
        k = k.view(B, S, s.kv_heads, s.head_dim)
        v = v.view(B, S, s.kv_heads, s.head_dim)
        if a.q_norm is not None:
            q, k = self.norm(q, a.q_norm), self.norm(k, a.k_norm)
        cos_cache, sin_cache = self.rope[layer.rope]
        cos, sin = cos_cache[positions][:, :, None], sin_cache[positions][:, :, None]
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        kc, vc = self.k_cache[n][:B], self.v_cache[n][:B]
        kc.index_copy_(2, slots, k.transpose(1, 2))
        vc.index_copy_(2, slots, v.transpose(1, 2))
        keys, values = kc[:, :, :kv_len], vc[:, :, :kv_len]
        q = q.transpose(1, 2)
        if s.attn_softcap:
            y = self._softcapped_attention(q, keys, values, mask)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=s.attn_scale, enable_gqa=True)
        y = self.xq(y.transpose(1, 2).reshape(B, S, s.heads * s.head_dim)) @ a.wo
        return y + a.bias["o"] if "o" in a.bias else y

    def _softcapped_attention(self, q, keys, values, mask):
        """Gemma 2: cap * tanh(scale * q.k / cap) before the mask (as ONNX Attention's softcap); SDPA has no
        softcap, so this is the explicit form."""
        s = self.spec
        group = s.heads // s.kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = (q @ keys.transpose(-1, -2)) * s.attn_scale
        scores = torch.tanh(scores / s.attn_softcap) * s.attn_softcap + mask
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values

    # ---- the network ----------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: torch.Tensor, kv_len: int,
                pad_mask: torch.Tensor, mlp: MLP) -> torch.Tensor:
        """ids/positions [B, S] int64 for cache slots start..start+S-1 (start: int64 tensor [1]); attends to
        slots < kv_len where pad_mask [B, kv_len] is set. Returns float32 logits of the last position [B, V]."""
        s = self.spec
        slots = start + torch.arange(ids.shape[1], device=self.device)
        masks = self.masks(slots, kv_len, pad_mask)
        x = self.embed[ids]
        if self._embed_scale is not None:
            x = x * self._embed_scale
        for n, layer in enumerate(self.layers):
            h = self.attention(n, self.norm(x, layer.norms["input_norm"]), positions, slots, kv_len,
                               masks[layer.window])
            if s.sandwich_norms:
                x = x + self.norm(h, layer.norms["post_attn_norm"])
                h = self.norm(mlp(n, self.norm(x, layer.norms["pre_ffn_norm"])), layer.norms["post_ffn_norm"])
            else:
                x = x + h
                h = mlp(n, self.norm(x, layer.norms["post_attn_norm"]))
            x = x + h
        last = self.norm(x[:, -1], self.final_norm)
        logits = (self.xq(last) @ self.lm_head.T).float()
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits
