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
from ..ops.blocks import block_format
from ..ops.contract import NO_CLAMP, SELECT_ACTIVE, SPARSE_GATED_MLP, STATE_TENSORS, X_FORMATS
from ..ops.onnx_ops import dequantize_blocks, functions_for, make_node, quantize_x_nodes
from ..ops.onnx_ops import opset_imports as tda_opset_imports
from . import io, names, quantize, weight_only
from .weight_only import Rule
from .engine_weights import EngineWeights
from .graph import Graph
from .spec import DecoderSpec
from .weights import ONNX_TYPES, WeightWriter

OPSET = 23
I64, F32, I32 = TensorProto.INT64, TensorProto.FLOAT, TensorProto.INT32
_ELEM = {"float32": F32, "int32": I32}


class _Nodes:
    """The Graph with the function-body builder's interface, so the one ONNX dequantizer
    (ops/onnx_ops.dequantize_blocks) builds the main graph's dense linears and embedding lookups too."""

    def __init__(self, g: Graph, name: str):
        self.g, self.name = g, name

    def __call__(self, op_type, *inputs, outputs=1, out=None, **attrs):
        if out is not None:
            outputs = [out] if isinstance(out, str) else list(out)
        return self.g.op(op_type, *inputs, name=self.name, outputs=outputs, **attrs)

    def const(self, value, onnx_type):
        return self.g.const(value, helper.tensor_dtype_to_np_dtype(onnx_type))


class _Decoder:
    def __init__(self, loaded, spec: DecoderSpec, writer: WeightWriter, weight_format: str = quantize.FLOAT,
                 weight_only: Rule | None = None, report: dict | None = None, down_format: str = quantize.AUTO,
                 x_format: str = "dtype"):
        self.lm, self.m, self.s, self.w, self.g = loaded, loaded.model, spec, writer, Graph()
        # a TensorRT graph (export/weight_only.py): dense linears and the embedding as int4/int8 ->
        # DequantizeLinear, MLP blocks typed int8; report gets what each block tensor became
        self.wo, self.report = weight_only, report if report is not None else {}
        self.T = ONNX_TYPES[spec.dtype]
        self._t_consts: dict[float, str] = {}
        quantize.down_choice(weight_format, down_format)  # refuses a down format without a block weight_format
        self.q = EngineWeights(loaded, weight_format, down_format) if quantize.is_blocks(weight_format) else None
        # contract x_format: "q8_0" makes gate/up and every dense block linear read x quantized per 32 values
        self.x = check_x_format(weight_format, x_format, weight_only)

    # ---- helpers -------------------------------------------------------------------------
    def t_const(self, value: float) -> str:
        """A scalar in the compute dtype (numpy cannot spell bfloat16, so cast from float32)."""
        if value not in self._t_consts:
            self._t_consts[value] = self.g.op("Cast", self.g.const(value, np.float32), to=self.T)
        return self._t_consts[value]

    def to_f32(self, x: str, name: str) -> str:
        return x if self.T == F32 else self.g.op("Cast", x, to=F32, name=name)

    def from_f32(self, y: str, name: str) -> str:
        return y if self.T == F32 else self.g.op("Cast", y, to=self.T, name=name)

    def dequantized(self, blocks: str, fmt: str, width: int, name: str) -> str:
        """float32 [rows, width] of uint8 blocks, exactly (the op function's dequantizer)."""
        return dequantize_blocks(_Nodes(self.g, name), fmt, blocks, self.g.i64([width]))

    def block_input(self, x: str, name: str, width: int) -> str:
        """x widened to float32 as a block linear reads it: as is, or quantized (x_format q8_0, the same
        nodes as the SparseGatedMLP function's)."""
        x = self.to_f32(x, name)
        return quantize_x_nodes(_Nodes(self.g, name), x, width) if self.x == "q8_0" else x

    def weight_only_matrix(self, name: str, enc, transpose: bool) -> str:
        """TensorRT's weight-only pattern of blocks enc (rows = outputs): DequantizeLinear of int4/int8 to T,
        [in, out] for a MatMul (transpose) or [rows, in] as stored (Gather, Gemm transB)."""
        c = weight_only.convert(enc.fmt, enc.blocks, self.wo)
        q, scale = (c.q.T, c.scale.T) if transpose else (c.q, c.scale)
        axis = 0 if transpose else 1  # the input axis
        qname = self.w.add_weight_only(f"{name}.weight_q", q, c.bits, f"int{c.bits}")
        if c.block is None:  # one scale per output row, on the other axis
            sname = self.w.add(f"{name}.weight_scale", torch.from_numpy(np.ascontiguousarray(scale.reshape(-1))))
            attrs = dict(axis=1 - axis)
        else:
            sname = self.w.add(f"{name}.weight_scale", torch.from_numpy(np.ascontiguousarray(scale)))
            attrs = dict(axis=axis, block_size=c.block)
        engine_name = {"embed": names.EMBED_BLOCKS, "lm_head": names.LM_HEAD_BLOCKS}.get(name)
        self.report[engine_name or names.linear_weight_blocks(name)] = c.describe(enc.fmt, self.s.dtype)
        return self.g.op("DequantizeLinear", qname, sname, name=name, **attrs)

    def linear(self, x: str, lin: torch.nn.Linear, name: str) -> str:
        """x @ W^T (+ b); a float weight is stored transposed so MatMul reads it as [in, out]; blocks
        [out, in/32*bb] are dequantized to float32 and multiply x widened to float32 (the contract's semantics)."""
        if self.q is None:
            y = self.g.op("MatMul", x, self.w.add(names.linear_weight_t(name), self.lm.tensor(lin).T), name=name)
        elif self.wo is not None:
            y = self.g.op("MatMul", x, self.weight_only_matrix(name, self.q.linear(lin), True), name=name)
        else:
            enc = self.q.linear(lin)
            w = self.dequantized(self.w.add_blocks(names.linear_weight_blocks(name), enc.blocks, enc.fmt), enc.fmt,
                                 lin.in_features, name)
            y = self.from_f32(self.g.op("MatMul", self.block_input(x, name, lin.in_features), self.g.op("Transpose", w, perm=[1, 0],
                                                                                  name=name), name=name), name)
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
        if self.q is None:
            fmt, down_fmt = "dtype", "same"
            gate_up = self.w.add(names.gate_up(n), torch.stack([self.lm.tensor(mlp.gate_proj),
                                                                self.lm.tensor(mlp.up_proj)], 1))
            down_t = self.w.add(names.down_t(n), self.lm.tensor(mlp.down_proj).T)
        else:
            gu, dt = self.q.gate_up(mlp), self.q.down_t(mlp)
            fmt, down_fmt = gu.fmt, ("same" if dt.fmt == gu.fmt else dt.fmt)
            trt = self.wo is not None
            gate_up = self.w.add_blocks(names.gate_up(n), gu.blocks, gu.fmt, as_int8=trt)
            down_t = self.w.add_blocks(names.down_t(n), dt.blocks, dt.fmt, as_int8=trt)
            if trt:
                for t, e in ((names.gate_up(n), gu), (names.down_t(n), dt)):
                    self.report[t] = {"from": e.fmt, "to": "int8 (the blocks' bytes, SparseGatedMLP plugin)",
                                      "block": 32, "requantized": False, "exact": True,
                                      "weights": int(e.blocks.size // block_format(e.fmt).block_bytes * 32),
                                      "bytes": int(e.blocks.nbytes)}
        state = {w: io.past_state_name(n, w) for w in STATE_TENSORS}
        args = {"hidden_states": x, "gate_up_weight": gate_up, "down_weight_t": down_t,
                "active_idx": state["active_idx"], "active_count": state["active_count"],
                "token_valid": token_valid, "scores_in": state["scores"]}
        out = f"{p}/output"
        scores = io.present_state_name(n, "scores")
        g.add_node(make_node(SPARSE_GATED_MLP, [args[i] for i in SPARSE_GATED_MLP.input_names], [out, scores],
                             f"{p}.sparse_gated_mlp", activation=self.s.activation, weight_format=fmt,
                             down_weight_format=down_fmt, x_format=self.x))
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
        if self.q is None:
            embed_w = self.w.add(names.EMBED, self.lm.tensor(embed))
            x = g.op("Gather", embed_w, io.INPUT_IDS, name="embed")
        elif self.wo is not None:  # TensorRT gathers rows of the dequantized int4/int8 matrix
            emb = self.q.embedding(embed)
            embed_w = self.weight_only_matrix("embed", emb, False)
            x = g.op("Gather", embed_w, io.INPUT_IDS, name="embed")
        else:  # gather the tokens' rows of blocks, then dequantize only those
            emb = self.q.embedding(embed)
            embed_w = self.w.add_blocks(names.EMBED_BLOCKS, emb.blocks, emb.fmt)
            rows = self.dequantized(g.op("Gather", embed_w, io.INPUT_IDS, name="embed"), emb.fmt, s.hidden, "embed")
            shape = g.op("Concat", g.op("Shape", io.INPUT_IDS, name="embed"), g.i64([s.hidden]), axis=0, name="embed")
            x = self.from_f32(g.op("Reshape", rows, shape, name="embed"), "embed")
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
        flat = g.op("Reshape", x, g.i64([-1, s.hidden]), name="lm_head")
        # Gemm(transB) reads the [V, H] matrix as stored, so tied embeddings need no second copy
        if self.q is None:
            lm_w = embed_w if s.tied_embeddings else self.w.add(names.LM_HEAD,
                                                                self.lm.tensor(self.m.get_output_embeddings()))
        elif self.wo is not None:
            lm_w = embed_w if s.tied_embeddings else self.weight_only_matrix(
                "lm_head", self.q.embedding(self.m.get_output_embeddings()), False)
        else:
            fmt = emb.fmt
            if not s.tied_embeddings:
                head = self.q.embedding(self.m.get_output_embeddings())
                embed_w, fmt = self.w.add_blocks(names.LM_HEAD_BLOCKS, head.blocks, head.fmt), head.fmt
            lm_w = self.dequantized(embed_w, fmt, s.hidden, "lm_head")
            flat = self.block_input(flat, "lm_head", s.hidden)
        logits = g.op("Gemm", flat, lm_w, transB=1, name="lm_head")
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
                  progress: bool = False, density_bounds=None, weight_format: str = quantize.FLOAT,
                  weight_only: Rule | None = None, report: dict | None = None,
                  down_format: str = quantize.AUTO, x_format: str = "dtype") -> onnx.ModelProto:
    """density_bounds: per-layer (lo, hi) held by the tda_density_bounds initializer (None: no clamp).
    weight_format: quantize.CHOICES ("float": the weights in spec.dtype); down_format: quantize.DOWN_CHOICES
    (down_weight_t's own format, quantize.down_choice); x_format: the contract's ("dtype" | "q8_0", only with
    a block weight_format and not for TensorRT). weight_only (block formats only):
    the graph for a TensorRT plan instead (export/weight_only.py); report, if given, gets
    {engine tensor: what it became}."""
    if weight_only is not None and not quantize.is_blocks(weight_format):
        raise ValueError("weight_only needs a block weight_format")
    if len(thresholds) != spec.num_layers:
        raise ValueError(f"{len(thresholds)} thresholds for {spec.num_layers} layers")
    bounds = density_bounds if density_bounds is not None else [NO_CLAMP] * spec.num_layers
    if len(bounds) != spec.num_layers:
        raise ValueError(f"{len(bounds)} density bounds for {spec.num_layers} layers")
    with torch.no_grad():
        return _Decoder(loaded, spec, writer, weight_format, weight_only, report,
                        down_format, x_format).build(thresholds, bounds, progress)


def check_x_format(weight_format: str, x_format: str, weight_only=None) -> str:
    """The contract's x_format for an engine, or ValueError naming what refuses it."""
    if x_format not in X_FORMATS:
        raise ValueError(f"x_format {x_format!r}: not one of {list(X_FORMATS)}")
    if x_format != "dtype":
        if not quantize.is_blocks(weight_format):
            raise ValueError(f"x_format {x_format} needs a block weight_format, not {weight_format}")
        if weight_only is not None:
            raise ValueError(f"x_format {x_format}: a TensorRT graph reads x as is (its weight-only linears and the "
                             f"CUDA kernels take float activations)")
    return x_format
