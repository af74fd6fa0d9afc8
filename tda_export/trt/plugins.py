"""tda::SparseGatedMLP and tda::SelectActive for TensorRT's Python API (`tensorrt` or `tensorrt_rtx`).

Same name, namespace, version and serialized fields as the C++ plugins (plugins/), so a plan built
with either creator deserializes with the other. Every decision (fields, shapes, types, formats,
workspace, launch arguments) is a call into the C++ plugins' own logic (logic.py); these classes
only translate TensorRT's Python objects. `enqueue` runs our CUDA C ABI (tda_export/kernels) on
TensorRT's stream, plus torch for the prefill's dense GEMMs (device.py).

Workspace sizes come from the CUDA kernel library's queries (compiled with nvcc on demand, host
code only), so an engine built on a CPU reserves what the GPU kernels will ask for.
"""
from __future__ import annotations

import functools

import numpy as np

from ..ops.contract import ACTIVATIONS, DTYPES, WEIGHT_FORMATS
from . import logic as lg


def _kernels():
    from ..kernels.abi import cuda_library

    return cuda_library()


@functools.lru_cache(maxsize=None)
def _queries():
    return lg.kernel_queries(_kernels())


def _code(trt, t) -> int:
    return {trt.DataType.FLOAT: lg.FLOAT, trt.DataType.HALF: lg.HALF, trt.DataType.BF16: lg.BF16,
            trt.DataType.INT32: lg.INT32, trt.DataType.INT8: lg.INT8}.get(t, lg.OTHER)


def _trt_type(trt, code: int):
    return {lg.FLOAT: trt.DataType.FLOAT, lg.HALF: trt.DataType.HALF, lg.BF16: trt.DataType.BF16,
            lg.INT32: trt.DataType.INT32}[code]


def _fields(trt, fc) -> list[tuple[str, bytes, bool]]:
    out = []
    for f in fc or ():
        data = np.asarray(f.data)
        out.append((f.name, data.tobytes(), f.type == trt.PluginFieldType.CHAR))
    return out


def _shapes(descs, which: str) -> list[tuple]:
    get = {"dims": lambda d: d.dims, "desc": lambda d: d.desc.dims, "max": lambda d: d.max,
           "min": lambda d: d.min}[which]
    return [tuple(get(d)) for d in descs]


@functools.lru_cache(maxsize=None)
def plugin_classes(trt):
    """(SparseGatedMlpCreator, SelectActiveCreator) classes for one TensorRT module."""
    L = lg.logic()

    class _Base(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        op: int
        weight_format = 0  # SparseGatedMLP's field (tda_weight_format_t); SelectActive has none
        down_weight_format = 0  # SparseGatedMLP's down_weight_format (0 = same as weight_format)

        def __init__(self, name: str, nb_outputs: int):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = name, L.namespace, L.version
            self.num_outputs = nb_outputs

        def get_capability_interface(self, type):
            return self

        def get_output_data_types(self, input_types):
            return [_trt_type(trt, c) for c in L.output_types(self.op, [_code(trt, t) for t in input_types])]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            # constants (the weights) are checked now, the rest at configure time
            dims = [tuple(e.get_constant_value() if e.is_constant() else -1 for e in inp) for inp in inputs]
            self._check(dims)
            return [trt.DimsExprs([inputs[i][d] for i, d in L.output_shape(self.op, o)])
                    for o in range(self.num_outputs)]

        def supports_format_combination(self, pos, in_out, num_inputs):
            io = [(_code(trt, d.desc.type), d.desc.format == trt.TensorFormat.LINEAR) for d in in_out[:pos + 1]]
            return L.supports(self.op, pos, io, self.weight_format)

        def configure_plugin(self, inp, out):
            self._check(_shapes(inp, "desc"))  # desc.dims: -1 where free; profiles bound inputs separately

        def on_shape_change(self, inp, out):
            self._check(_shapes(inp, "dims"))

        def attach_to_context(self, context):
            return self.clone()

        def set_tactic(self, tactic):
            pass

        def get_valid_tactics(self):
            return []

    class SparseGatedMlpPlugin(_Base):
        op = lg.MLP

        def __init__(self, attrs: lg.MlpAttrs):
            super().__init__(L.mlp_name, 2)
            self.attrs = attrs
            self.weight_format = attrs.weight_format
            self.down_weight_format = attrs.down_weight_format

        def clone(self):
            return SparseGatedMlpPlugin(self.attrs)

        def _check(self, dims):
            return L.mlp_check_shapes(dims, self.weight_format, self.down_weight_format)

        def get_fields_to_serialize(self):
            # PluginField holds a pointer into the array: the arrays must outlive TensorRT's read.
            self._serialized = [(name, np.frombuffer(value, dtype=np.int8).copy())
                                for name, value in L.mlp_serialized_fields(self.attrs)]
            return trt.PluginFieldCollection([trt.PluginField(name, data, trt.PluginFieldType.CHAR)
                                              for name, data in self._serialized])

        def get_workspace_size(self, input_desc, output_desc):
            sizes = L.mlp_max_sizes(_shapes(input_desc, "max"), self.weight_format, self.down_weight_format)
            min_seq = tuple(input_desc[0].min)[1]
            return L.mlp_workspace_size(_code(trt, input_desc[0].desc.type), self.attrs, sizes, min_seq, _queries())

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from . import device

            sizes = L.mlp_check_shapes(_shapes(input_desc, "dims"), self.weight_format, self.down_weight_format)
            B, S, H, I = sizes
            if B == 0:
                return
            t = _code(trt, input_desc[0].type)
            buf = lg.MlpBuffers(*[int(p) for p in inputs], *[int(p) for p in outputs])
            kernels = _kernels()
            if L.is_decode(S):
                for b0, nb in L.chunks(B):
                    # the plan's decode version and what it needs (within the reservation), never a query
                    # under today's $TDA_DECODE_VERSION
                    a, nbytes = L.decode_call(t, self.attrs, sizes, b0, nb, buf, _queries())
                    kernels.call("tda_sparse_gated_mlp_decode", a, int(workspace), nbytes, int(stream))
                device.copy(outputs[1], inputs[6], B * I, "float32", stream)  # decode keeps the scores
            else:
                plan = L.prefill_plan(t, self.attrs, sizes, buf, int(workspace), _queries())
                device.prefill(plan, DTYPES[t], ACTIVATIONS[self.attrs.activation], sizes, inputs[0], inputs[1],
                               inputs[2], outputs[0], kernels, stream, WEIGHT_FORMATS[self.weight_format])

    class SelectActivePlugin(_Base):
        op = lg.SELECT

        def __init__(self):
            super().__init__(L.select_name, 2)

        def clone(self):
            return SelectActivePlugin()

        def _check(self, dims):
            return L.select_check_shapes(dims)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])

        def get_workspace_size(self, input_desc, output_desc):
            batch, inter = L.select_check_shapes(_shapes(input_desc, "max"))
            return L.select_workspace_size(batch, inter, _queries())

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            batch, inter = L.select_check_shapes(_shapes(input_desc, "dims"))
            kernels = _kernels()
            for b0, nb in L.chunks(batch):
                a = L.select_args(inter, b0, nb, int(inputs[0]), int(inputs[1]), int(inputs[2]), int(outputs[0]),
                                  int(outputs[1]))
                kernels.call("tda_select_active", a, int(workspace),
                             kernels.workspace_size("tda_select_active", a), int(stream))

    class _Creator(trt.IPluginCreatorV3One):
        def __init__(self, name, field_names):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = name, L.namespace, L.version
            self._empty = np.zeros(0, dtype=np.int8)  # kept alive: PluginField holds a pointer into it
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(n, self._empty, trt.PluginFieldType.CHAR) for n in field_names])

    class SparseGatedMlpCreator(_Creator):
        def __init__(self):
            super().__init__(L.mlp_name, L.mlp_fields)

        def create_plugin(self, name, fc, phase):
            # BUILD: fields from an ONNX node, the decode version is fixed now; RUNTIME: a plan's fields
            attrs = L.parse_mlp_fields(_fields(trt, fc), phase == trt.TensorRTPhase.BUILD)
            if attrs.x_format:  # runs on the CPU kernel library only: refused now where enqueue runs CUDA's
                L.mlp_check_backend(attrs, _kernels().backend)
            return SparseGatedMlpPlugin(attrs)

    class SelectActiveCreator(_Creator):
        def __init__(self):
            super().__init__(L.select_name, ())

        def create_plugin(self, name, fc, phase):
            L.parse_select_fields(_fields(trt, fc))
            return SelectActivePlugin()

    return SparseGatedMlpCreator, SelectActiveCreator


_REGISTERED: dict = {}


def register(trt) -> list:
    """Register both Python creators with `trt`'s plugin registry (once per module); returns them.
    The creators must stay referenced while TensorRT may call them, hence the module-level keep."""
    key = trt.__name__
    if key not in _REGISTERED:
        creators = [cls() for cls in plugin_classes(trt)]
        registry = trt.get_plugin_registry()
        for c in creators:
            if not registry.register_creator(c, lg.logic().namespace):
                raise RuntimeError(f"{trt.__name__}: registering plugin creator {c.name} failed")
        _REGISTERED[key] = creators
    return _REGISTERED[key]


__all__ = ["plugin_classes", "register"]
