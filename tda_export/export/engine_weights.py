"""A model's weights as a block-quantized engine stores them (quantize.py's rules applied to its modules).

One place computes the engine's blocks, and both of its users call it: the exporter writes them
(decoder.py), and calibration and evaluation run the torch model with its weights replaced by their exact
dequantization (`apply`), so thresholds and perplexities describe what the engine computes.
"""
from __future__ import annotations

import torch

from .. import arch
from ..ops.blocks import dequantize
from . import quantize
from .quantize import Encoded


class EngineWeights:
    def __init__(self, loaded, choice: str, down: str = quantize.AUTO):
        """loaded: models.LoadedModel (meta modules or a runnable model; tensors come from loaded.tensors);
        choice/down: --weight-format / --down-weight-format."""
        assert quantize.is_blocks(choice), choice
        self.lm, self.choice, self.down = loaded, choice, quantize.down_choice(choice, down)

    def _source(self, module: torch.nn.Module):
        return self.lm.tensors.blocks(self.lm.param_name(module))

    def _encode(self, module: torch.nn.Module, transpose: bool = False, keep_source_format: bool = False,
                choice: str | None = None) -> Encoded:
        name = self.lm.param_name(module)
        weight = lambda: (lambda w: w.T if transpose else w)(self.lm.tensor(module).float()).numpy()  # noqa: E731
        return quantize.encode(choice or self.choice, name, weight, None if transpose else self._source(module),
                               keep_source_format)

    def linear(self, lin: torch.nn.Module) -> Encoded:
        """[out, in/32*bb]: an attention projection (its GGUF rows carried when in the chosen format)."""
        return self._encode(lin)

    def embedding(self, module: torch.nn.Module) -> Encoded:
        """[V, H/32*bb]: the token embedding or an untied lm_head (a GGUF's block format kept)."""
        return self._encode(module, keep_source_format=True)

    def gate_up(self, mlp: torch.nn.Module) -> Encoded:
        """[I, 2, H/32*bb]: neuron j's gate and up rows side by side."""
        return quantize.stack(self.choice, self.lm.param_name(mlp) + ".gate_up",
                              [self._encode(mlp.gate_proj), self._encode(mlp.up_proj)])

    def down_t(self, mlp: torch.nn.Module) -> Encoded:
        """[I, H/32*bb]: W_down transposed, requantized along H in the down format (never carried: a GGUF
        blocks it along I)."""
        return self._encode(mlp.down_proj, transpose=True, choice=self.down)


def dequantized(enc: Encoded) -> torch.Tensor:
    return torch.from_numpy(dequantize(enc.fmt, enc.blocks))


def apply(loaded, choice: str, down: str = quantize.AUTO, x: str = quantize.FLOAT) -> dict[str, str]:
    """Replace the runnable model's quantized weights by the engine's exact dequantized values (in the model's
    dtype); returns parameter name -> format. A no-op for choice "float". x = "q8_0" (--x-format) also makes
    every block linear but the down projection read its input quantized (contract x_format), through forward
    pre-hooks, as the engine's kernels and graph do."""
    if quantize.x_choice(choice, x) != "dtype":
        _quantize_inputs(loaded.model)
    if not quantize.is_blocks(choice):
        quantize.down_choice(choice, down)  # refuses a down format without a block choice
        return {}
    ew, model, formats = EngineWeights(loaded, choice, down), loaded.model, {}

    def put(module, enc: Encoded, value: torch.Tensor | None = None):
        with torch.no_grad():
            module.weight.copy_(dequantized(enc) if value is None else value)
        formats[loaded.param_name(module)] = enc.fmt

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    put(embed, ew.embedding(embed))
    if head is not None and not tied:
        put(head, ew.embedding(head))
    for layer in arch.decoder_layers(model):
        for c in "qkvo":
            lin = getattr(layer.self_attn, f"{c}_proj")
            put(lin, ew.linear(lin))
        mlp = layer.mlp
        gate_up = ew.gate_up(mlp)
        both = dequantized(gate_up)
        put(mlp.gate_proj, gate_up, both[:, 0])
        put(mlp.up_proj, gate_up, both[:, 1])
        down = ew.down_t(mlp)
        put(mlp.down_proj, down, dequantized(down).T)
    return formats


def _quantize_inputs(model) -> None:
    """Forward pre-hooks replacing the input of q/k/v/o, gate, up and the lm_head by the contract's quantized
    x (ops/torch_blocks.quantize_x, computed in float32, cast back to the module's dtype). The embedding is a
    lookup, and down's input z is never quantized."""
    from ..ops.torch_blocks import quantize_x

    def hook(module, args):
        x = args[0]
        return (quantize_x(x.float()).to(x.dtype),) + tuple(args[1:])

    modules = [model.get_output_embeddings()]
    for layer in arch.decoder_layers(model):
        modules += [getattr(layer.self_attn, f"{c}_proj") for c in "qkvo"]
        modules += [layer.mlp.gate_proj, layer.mlp.up_proj]
    for m in modules:
        if m is not None:
            m.register_forward_pre_hook(hook)
