"""The `tda-export` command line.

Data flows one way: model -> calibrate -> eval -> build (export) -> run/serve/bench.
"""
from __future__ import annotations

import os
import sys

# Decode runs hundreds of short OpenMP regions per token (torch ops and our CPU kernel share torch's
# libgomp). With libgomp's default active spin-wait a loaded machine loses a scheduler tick per barrier:
# SmolLM2 torch-backend decode measured 3 tok/s spinning vs 11-16 passive on the shared 2-core box.
# libgomp reads this once when torch loads it, so it is set before anything imports torch. The native
# runtime shares that libgomp: without a bounded spin (GOMP_SPINCOUNT, which passive mode obeys) its
# ~150 parallel regions per step would each sleep and wake (~20% of native decode, docs/native.md).
from .native.threads import gomp_spin_default  # noqa: E402  (standard library only)

gomp_spin_default()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from . import __version__  # noqa: E402


class UserError(click.ClickException):
    """Bad input from the user: printed as one clear line, exit code 2."""
    exit_code = 2


class _Commands(click.Group):
    def list_commands(self, ctx):
        return list(self.commands)  # in the order of the flow (model -> calibrate -> ... -> bench), not a-z

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # the reader left (`tda-export inspect DIR | head`): stop quietly with the shell's SIGPIPE
            # status, as Unix tools do. stdout goes to /dev/null so the interpreter's final flush stays quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tda-export")
def main():
    """Sparse-MLP (TDA) decoding for Hugging Face LLMs: calibrate, evaluate, export, serve.

    \b
    Quick start (build calibrates at the recipe's density when not given -c):
      tda-export build -m smollm2-135m -o engine/
      tda-export run   -e engine/ -p "The capital of France is" -n 32

    \b
    Step by step on the embedded default model:
      tda-export calibrate -m smollm2-135m -o cal.json
      tda-export eval      -m smollm2-135m -c cal.json
      tda-export build     -m smollm2-135m -c cal.json -o engine/   [--target tensorrt-rtx --dtype fp16]
      tda-export inspect   engine/
      tda-export serve     -e engine/ --port 8000

    --model takes a recipe name (see `tda-export recipes`), a Hugging Face model
    directory (config.json + *.safetensors) or a .gguf file. `tda-export COMMAND -h`
    explains each command's options.
    """


@main.command()
def recipes():
    """List the built-in model recipes: name, architecture, engine dtype (build's default --dtype), default
    density, where the weights come from. Any recipe name works as --model."""
    from .recipes import list_recipes

    for r in list_recipes().values():
        click.echo(f"{r.name:16s} {r.architecture:12s} {r.dtype:9s} density {r.density:.2f}  {r.description}")


def _register():
    from .cli_export import build, inspect
    from .cli_quality import calibrate, eval_
    from .cli_runtime import bench, run, serve
    from .cli_setup import setup
    from .cli_trt import check

    for command in (setup, calibrate, eval_, build, inspect, check, run, serve, bench):
        main.add_command(command)


_register()
