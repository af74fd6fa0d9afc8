"""Node and value bookkeeping for a hand-built ONNX graph."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}
        self._count: dict[str, int] = {}

    def _name(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return f"{hint}_{n}" if n else hint

    def op(self, op_type: str, *inputs: str, name: str = "", outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Add a node; returns its output name(s). `name` scopes the node and its outputs."""
        node_name = self._name(f"{name}/{op_type}" if name else op_type)
        outs = outputs if isinstance(outputs, list) else [f"{node_name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def add_node(self, node: onnx.NodeProto) -> None:
        self.nodes.append(node)

    def const(self, value, dtype) -> str:
        """A shared Constant node (deduplicated by value and type)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._name(f"const/{arr.dtype}")
            self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                               value=numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
