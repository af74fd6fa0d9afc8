"""Layer accounting of a parsed network: which exported `tda` nodes became plugin layers.

A CPU cannot deserialize a plan, so the per-layer summary recorded in the manifest comes from
the network definition the plan was built from. A `tda` node that did not become a plugin layer
(the parser inlined its ONNX reference function instead) is an error, never a silent fallback.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class PluginCoverageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Layer:
    name: str
    type: str                 # TensorRT LayerType name, e.g. "PLUGIN_V3"
    plugin: str | None = None  # "namespace::name/version" for plugin layers


def plugin_id(namespace: str, name: str, version: str) -> str:
    return f"{namespace}::{name}/{version}"


def check_coverage(tda_nodes: list[tuple[str, str]], layers: list[Layer], namespace: str, version: str) -> None:
    """tda_nodes: (node name, op type) of the ONNX graph. Every one must be a plugin layer of the same
    name carrying our plugin; raises PluginCoverageError naming the first few that are not."""
    by_name = {l.name: l for l in layers}
    missing = []
    for node, op in tda_nodes:
        want = plugin_id(namespace, op, version)
        got = by_name.get(node)
        if got is None or got.plugin != want:
            missing.append(f"{node} ({want}: {'no layer of that name' if got is None else got.plugin or got.type})")
    if missing:
        raise PluginCoverageError(
            f"{len(missing)} of {len(tda_nodes)} tda nodes did not become plugin layers (the reference function "
            f"would have been inlined): " + "; ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    extra = [l.name for l in layers if l.plugin and l.plugin.startswith(namespace + "::")
             and l.name not in dict(tda_nodes)]
    if extra:
        raise PluginCoverageError(f"plugin layers with no tda node: {', '.join(extra[:4])}")


def summary(layers: list[Layer]) -> dict:
    """The manifest's per-layer summary: counts by type and by plugin, and the plugin layers by name."""
    return {
        "num_layers": len(layers),
        "by_type": dict(sorted(Counter(l.type for l in layers).items())),
        "plugins": dict(sorted(Counter(l.plugin for l in layers if l.plugin).items())),
        "plugin_layers": [{"name": l.name, "plugin": l.plugin} for l in layers if l.plugin],
    }
