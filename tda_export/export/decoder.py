"""The decoder network as one ONNX graph (prefill and decode, one copy of the weights).

Weights are read from the checkpoint one tensor at a time (loaded.tensor) and
handed to the writer at once, so the graph is built from a model whose modules
live on the meta device and memory holds about one tensor at a time.

Standard opset-23 ops only (Attention with past/present KV, RotaryEmbedding,
RMSNormalization) plus the two TDA ops. Per layer the MLP is
tda::SparseGatedMLP (dense over a prompt, accumulating neuron scores; sparse in
decode) followed by tda::SelectActive at that layer's threshold, so the state
handed to the next call is always current.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from .. import arch
from ..ops.contract import NO_CLAMP, SELECT_ACTIVE, SPARSE_GATED_MLP, STATE_TENSORS
from ..ops.onnx_ops import functions_for, make_node
from ..ops.onnx_ops import opset_imports as tda_opset_imports
from . import io, names
from .graph import Graph
from .spec import DecoderSpec
from .weights import ONNX_TYPES, WeightWriter

OPSET = 23
I64, F32, I32 = TensorProto.INT64, TensorProto.FLOAT, TensorProto.INT32
_ELEM = {"float32": F32, "int32": I32}


class _Decoder:
    def __init__(self, loaded, spec: DecoderSpec, writer: WeightWriter):
        self.lm, self.m, self.s, self.w, self.g = loaded, loaded.model, spec, writer, Graph()
        self.T = ONNX_TYPES[spec.dtype]
        self._t_consts: dict[float, str] = {}

    # ---- helpers -------------------------------------------------------------------------
    def t_const(self, value: float) -> str:
        """A scalar in the compute dtype (numpy cannot spell bfloat16, so cast from float32)."""
        if value not in self._t_consts:
            self._t_consts[value] = self.g.op("Cast", self.g.const(value, np.float32), to=self.T)
        return self._t_consts[value]

    def linear(self, x: str, lin: torch.nn.Linear, name: str) -> str:
        """x @ W^T (+ b); the weight is stored transposed so MatMul reads it as [in, out]."""
        y = self.g.op("MatMul", x, self.w.add(names.linear_weight_t(name), self.lm.tensor(lin).T), name=name)
        if lin.bias is not None:
            y = self.g.op("Add", y, self.w.add(names.linear_bias(name), self.lm.tensor(lin, "bias")), name=name)
        return y

    def norm(self, x: str, module, name: str) -> str:
        weight = self.lm.tensor(module).float() + self.s.norm_offset  # Gemma's (1 + w), folded in float32
        return self.g.op("RMSNormalization", x, self.w.add(names.weight(name), weight), name=name, axis=-1,
                         epsilon=self.s.rms_eps, stash_type=1)

    # ---- graph parts ---------------------------------------------------------------------
    def inputs(self):
        g, s = self.g, self.s
        g.input(io.INPUT_IDS, I64, [io.BATCH, io.SEQ])
        g.input(io.ATTENTION_MASK, I64, [io.BATCH, io.TOTAL])
        g.input(io.POSITION_IDS, I64, [io.BATCH, io.SEQ])
        kv = [io.BATCH, s.kv_heads, io.PAST, s.head_dim]
        for n in range(s.num_layers):
            for which in ("key", "value"):
                g.input(io.past_key(n, which), self.T, kv)
            for what, (dtype, shape) in io.tda_state_shapes(s.intermediate).items():
                g.input(io.past_state_name(n, what), _ELEM[dtype], list(shape))
        g.input(io.THRESHOLDS_INPUT, F32, [s.num_layers])
        g.input(io.DENSITY_BOUNDS_INPUT, F32, [s.num_layers, 2])

    def attention_masks(self) -> dict[int | None, str]:
        """Additive [B, 1, S, P+S] masks, one per distinct window: causal by cache index, padding from
        attention_mask. A large finite negative (not -inf) keeps fully masked rows (left padding) finite."""
        g = self.g
        seq = g.op("Shape", io.INPUT_IDS, start=1, end=2)
        total = g.op("Shape", io.ATTENTION_MASK, start=1, end=2)
        past = g.op("Sub", total, seq)
        scalar = lambda v: g.op("Squeeze", v, g.i64([0]))  # noqa: E731
        kv_idx = g.op("Range", g.i64(0), scalar(total), g.i64(1))
        q_idx = g.op("Range", scalar(past), scalar(total), g.i64(1))
        diff = g.op("Sub", g.op("Unsqueeze", q_idx, g.i64([1])), g.op("Unsqueeze", kv_idx, g.i64([0])))  # [S, T]
        causal = g.op("GreaterOrEqual", diff, g.i64(0))
        pad = g.op("Unsqueeze", g.op("Cast", io.ATTENTION_MASK, to=TensorProto.BOOL), g.i64([1, 2]))  # [B,1,1,T]
        neg = self.t_const(-0.5 * float(torch.finfo(getattr(torch, self.s.dtype)).max))
        masks = {}
        for window in sorted({l.window for l in self.s.layers}, key=lambda w: w or 0):
            allowed = causal if window is None else g.op("And", causal, g.op("Less", diff, g.i64(window)))
            allowed = g.op("And", pad, g.op("Unsqueeze", allowed, g.i64([0, 1])))
            masks[window] = g.op("Where", allowed, self.t_const(0.0), neg, name=f"mask_window{window or 'none'}")
        return masks

    def rope_caches(self) -> dict[str, tuple[str, str]]:
        """cos/sin [max_context, head_dim/2] per rope type, taken from HF's own rotary module so every
        scaling variant (llama3, linear, ...) and attention factor is reproduced."""
        rot = self.m.model.rotary_emb
        pos = torch.arange(self.s.max_context)[None]
        x = torch.zeros(1, dtype=torch.float32)
        caches = {}
        for rope in self.s.rope_types:
            with torch.no_grad():
                cos, sin = rot(x, pos) if rope == "default" else rot(x, pos, rope)
            half = self.s.head_dim // 2
            caches[rope] = (self.w.add(names.rope(rope, "cos"), cos[0, :, :half].float()),
                            self.w.add(names.rope(rope, "sin"), sin[0, :, :half].float()))
        return caches

    def attention(self, n: int, x: str, layer, masks, ropes) -> str:
        g, s, a = self.g, self.s, layer.self_attn
        p = names.attn(n)
        q, k, v = (self.linear(x, getattr(a, f"{c}_proj"), names.attn_proj(n, c)) for c in "qkv")
        if s.qk_norm:  # per-head RMSNorm on [B, S, heads, head_dim]
            heads_shape = g.i64([0, 0, -1, s.head_dim])
            flat = g.i64([0, 0, -1])
            q = g.op("Reshape", self.norm(g.op("Reshape", q, heads_shape), a.q_norm, names.qk_norm(n, "q")), flat)
            k = g.op("Reshape", self.norm(g.op("Reshape", k, heads_shape), a.k_norm, names.qk_norm(n, "k")), flat)
        cos, sin = ropes[s.layers[n].rope]
        q = g.op("RotaryEmbedding", q, cos, sin, io.POSITION_IDS, name=f"{p}.rope_q", num_heads=s.heads)
        k = g.op("RotaryEmbedding", k, cos, sin, io.POSITION_IDS, name=f"{p}.rope_k", num_heads=s.kv_heads)
        # KV concat outside Attention: TensorRT(-RTX) imports only single-output Attention nodes
        to_heads = lambda t: g.op("Transpose", g.op("Reshape", t, g.i64([0, 0, -1, s.head_dim])),  # noqa: E731
                                  perm=[0, 2, 1, 3])
        k = g.op("Concat", io.past_key(n, "key"), to_heads(k), axis=2, outputs=[io.present_key(n, "key")])
        v = g.op("Concat", io.past_key(n, "value"), to_heads(v), axis=2, outputs=[io.present_key(n, "value")])
        attrs = dict(scale=s.attn_scale)
        if s.attn_softcap:
            attrs["softcap"] = float(s.attn_softcap)
        y = g.op("Attention", to_heads(q), k, v, masks[s.layers[n].window], name=p, **attrs)  # [B, heads, S, hd]
        y = g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.i64([0, 0, -1]), name=p)
        return self.linear(y, a.o_proj, names.attn_proj(n, "o"))

    def mlp(self, n: int, x: str, mlp, token_valid: str) -> str:
        g, p = self.g, names.mlp(n)
        gate_up = self.w.add(names.gate_up(n), torch.stack([self.lm.tensor(mlp.gate_proj),
                                                            self.lm.tensor(mlp.up_proj)], 1))
        down_t = self.w.add(names.down_t(n), self.lm.tensor(mlp.down_proj).T)
        state = {w: io.past_state_name(n, w) for w in STATE_TENSORS}
        args = {"hidden_states": x, "gate_up_weight": gate_up, "down_weight_t": down_t,
                "active_idx": state["active_idx"], "active_count": state["active_count"],
                "token_valid": token_valid, "scores_in": state["scores"]}
        out = f"{p}/output"
        scores = io.present_state_name(n, "scores")
        g.add_node(make_node(SPARSE_GATED_MLP, [args[i] for i in SPARSE_GATED_MLP.input_names], [out, scores],
                             f"{p}.sparse_gated_mlp", activation=self.s.activation))
        tau = g.op("Gather", io.THRESHOLDS_INPUT, g.i64(n), name=f"{p}.threshold")
        bounds = g.op("Gather", io.DENSITY_BOUNDS_INPUT, g.i64(n), name=f"{p}.density_bounds")
        g.add_node(make_node(SELECT_ACTIVE, [scores, tau, bounds],
                             [io.present_state_name(n, "active_idx"), io.present_state_name(n, "active_count")],
                             f"{p}.select_active"))
        return out

    def build(self, thresholds: list[float], bounds, progress: bool) -> onnx.ModelProto:
        g, s = self.g, self.s
        self.inputs()
        self.w.add_array(io.THRESHOLDS_INPUT, np.asarray(thresholds, np.float32))
        self.w.add_array(io.DENSITY_BOUNDS_INPUT, np.asarray(bounds, np.float32).reshape(s.num_layers, 2))
        embed = self.m.get_input_embeddings()
        embed_w = self.w.add(names.EMBED, self.lm.tensor(embed))
        x = g.op("Gather", embed_w, io.INPUT_IDS, name="embed")
        if s.embed_scale:
            x = g.op("Mul", x, self.t_const(s.embed_scale), name="embed")
        masks = self.attention_masks()
        ropes = self.rope_caches()
        seq = g.op("Shape", io.INPUT_IDS, start=1, end=2)
        token_valid = g.op("Cast", g.op("Slice", io.ATTENTION_MASK, g.op("Neg", seq), g.i64([2 ** 62]), g.i64([1])),
                           to=F32, name="token_valid")
        layers = arch.decoder_layers(self.m)
        for n, layer in enumerate(tqdm(layers, desc="export layers", disable=not progress, leave=False)):
            norm = lambda which: names.layer_norm(n, which)  # noqa: E731
            h = self.attention(n, self.norm(x, layer.input_layernorm, norm("input_norm")), layer, masks, ropes)
            if s.sandwich_norms:
                h = self.norm(h, layer.post_attention_layernorm, norm("post_attn_norm"))
                x = g.op("Add", x, h, name=f"{names.layer(n)}.residual")
                h = self.norm(x, layer.pre_feedforward_layernorm, norm("pre_ffn_norm"))
                h = self.norm(self.mlp(n, h, layer.mlp, token_valid), layer.post_feedforward_layernorm,
                              norm("post_ffn_norm"))
            else:
                x = g.op("Add", x, h, name=f"{names.layer(n)}.residual")
                h = self.mlp(n, self.norm(x, layer.post_attention_layernorm, norm("post_attn_norm")),
                             layer.mlp, token_valid)
            x = g.op("Add", x, h, name=f"{names.layer(n)}.residual")
        x = self.norm(x, self.m.model.norm, names.FINAL_NORM)
        lm_w = embed_w if s.tied_embeddings else self.w.add(names.LM_HEAD, self.lm.tensor(self.m.get_output_embeddings()))
        # Gemm(transB) reads the [V, H] matrix as stored, so tied embeddings need no second copy
        logits = g.op("Gemm", g.op("Reshape", x, g.i64([-1, s.hidden])), lm_w, transB=1, name="lm_head")
        logits = g.op("Cast", logits, to=F32, name="lm_head")
        if s.final_softcap:
            cap = g.const(float(s.final_softcap), np.float32)
            logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, cap)), cap, name="final_softcap")
        g.op("Reshape", logits, g.op("Concat", g.op("Shape", io.INPUT_IDS), g.i64([-1]), axis=0),
             outputs=[io.LOGITS])
        self.outputs()
        graph = helper.make_graph(g.nodes, "tda_decoder", g.inputs, g.outputs, initializer=self.w.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)] + tda_opset_imports(),
                                 functions=functions_for(graph), producer_name="tda-export")

    def outputs(self):
        g, s = self.g, self.s
        g.output(io.LOGITS, F32, [io.BATCH, io.SEQ, s.vocab])
        kv = [io.BATCH, s.kv_heads, io.TOTAL, s.head_dim]
        for n in range(s.num_layers):
            for which in ("key", "value"):
                g.output(io.present_key(n, which), self.T, kv)
            for what, (dtype, shape) in io.tda_state_shapes(s.intermediate).items():
                g.output(io.present_state_name(n, what), _ELEM[dtype], list(shape))


def build_decoder(loaded, spec: DecoderSpec, thresholds: list[float], writer: WeightWriter,
                  progress: bool = False, density_bounds=None) -> onnx.ModelProto:
    """density_bounds: per-layer (lo, hi) held by the tda_density_bounds initializer (None: no clamp)."""
    if len(thresholds) != spec.num_layers:
        raise ValueError(f"{len(thresholds)} thresholds for {spec.num_layers} layers")
    bounds = density_bounds if density_bounds is not None else [NO_CLAMP] * spec.num_layers
    if len(bounds) != spec.num_layers:
        raise ValueError(f"{len(bounds)} density bounds for {spec.num_layers} layers")
    with torch.no_grad():
        return _Decoder(loaded, spec, writer).build(thresholds, bounds, progress)
