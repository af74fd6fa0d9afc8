"""Which backend runs an engine: the rule, as a pure function of what is known about the engine, the
request and the machine (no torch, no ONNX Runtime, no compiler; tests drive it with plain values).

`auto` prefers, in order:
1. torch with the CUDA kernels, unless device="cpu": the only backend that decodes sparsely on a GPU;
2. the native C++ runtime on a CPU, for the engines it runs (float32 compute, weights in model.safetensors
   as float32 or q8_0/q4_0/q4_1 blocks): it decodes faster than torch and ONNX Runtime at every density
   (bench/RESULTS.md, native section); on float weights its per-layer rule (cpp/src/cpu_executor.h
   kDenseAbove) decodes a layer densely once most of its neurons are active, which bounds TDA's cost
   there (d=0.9 measured 0.97x of dense on fp32), while block engines always decode the MLP sparsely
   (d=0.9 measured 0.86x of dense on q4_1, README);
3. else whichever of torch and ONNX Runtime decodes faster here, measured once and cached (choose.py).
Engines from before the decoder_spec run only on ONNX Runtime. An explicit backend is taken as asked.

The machine facts (are the CUDA kernels usable, can the native runtime run this engine) cost a GPU probe
or a C++ build, so `select` takes them as functions and asks each at most once, only when the rule gets to
it: an explicit backend never builds the native runtime. Each preference auto passes over leaves a note,
and `report_line` turns the notes into the one line a user reads: auto never lands silently on a slower
backend.
"""
from __future__ import annotations

from collections.abc import Callable

from ..ops.contract import BLOCK_FORMATS
from dataclasses import dataclass

BACKENDS = ("auto", "torch", "onnxruntime", "native", "tensorrt")
MEASURE = "torch|onnxruntime"  # Selection.backend: the faster of the two on this CPU, measured (choose.py)
SETUP = "tda-export setup"     # builds the native runtime (and installs what it needs)


@dataclass(frozen=True)
class Request:
    """What the rule needs to know, gathered from the call and the manifest without touching the machine."""
    backend: str                  # one of BACKENDS
    device: str | None = None     # "cpu" keeps auto off the GPU
    decoder_spec: bool = True     # the manifest has one (else only ONNX Runtime runs the engine)
    native_reason: str | None = None  # why the native runtime cannot run this engine (native_unusable_reason)
    native_off: bool = False      # TDA_EXPORT_NATIVE=0


@dataclass(frozen=True)
class Selection:
    backend: str                  # torch | onnxruntime | native | tensorrt | MEASURE
    device: str | None = None     # for torch: "cpu" where auto chose the CPU
    notes: tuple[str, ...] = ()   # why auto passed over what it prefers, one clause each
    auto: bool = False            # chosen by auto (an explicit backend reports nothing)


def native_unusable_reason(data: dict) -> str | None:
    """Why the native CPU executor cannot run this engine (None if it can): decided from the manifest."""
    if data.get("weights_file") != "model.safetensors":
        return "built before model.safetensors (weights inside model.onnx); rebuild it for the native backend"
    if data.get("dtype") != "float32":
        return f"the native CPU executor runs float32 engines, this one is {data.get('dtype')}"
    other = sorted({f for f in (data.get("weight_formats") or {}).values() if f not in ("float32", *BLOCK_FORMATS)})
    if other:  # it reads float32 and the block formats (cpp/src/cpu_executor.cpp)
        return f"the native CPU executor reads float32 and {'/'.join(BLOCK_FORMATS)} tensors, not {', '.join(other)}"
    return None


def select(req: Request, cuda: Callable[[], bool | str], native: Callable[[], str | None]) -> Selection:
    """The backend for `req`. cuda() -> True (usable), False (no GPU) or why a GPU's kernels are unusable;
    native() -> None where the native runtime runs the engine here, else why not (one line)."""
    if req.backend != "auto":
        return Selection(req.backend, req.device)
    if not req.decoder_spec:
        return Selection("onnxruntime", notes=("built by an older tda-export without a decoder_spec, so only ONNX "
                                               "Runtime can run it; rebuild it for the torch and native backends",),
                         auto=True)
    notes = []
    if req.device != "cpu":
        gpu = cuda()
        if gpu is True:
            return Selection("torch", req.device, auto=True)
        if isinstance(gpu, str):
            notes.append(f"not torch on the GPU: the CUDA kernels are unusable ({first_line(gpu)})")
    if req.native_reason is not None:
        notes.append(f"not native: {req.native_reason}")
    elif req.native_off:
        notes.append("not native: TDA_EXPORT_NATIVE=0")
    elif (why := native()) is not None:
        why = first_line(why)
        hint = "" if SETUP in why else f"; `{SETUP}` gets the native runtime, the fastest on a CPU"
        notes.append(f"not native: {why}{hint}")
    else:
        return Selection("native", notes=tuple(notes), auto=True)
    return Selection(MEASURE, "cpu", tuple(notes), auto=True)


def report_line(sel: Selection, used: str, choice=None) -> str | None:
    """One line saying what auto chose where it passed over a preference (why, and how to get it) or
    measured; None when there is nothing to say. used: the backend's name; choice: choose.Choice."""
    if not sel.auto or (not sel.notes and choice is None):
        return None
    parts = [f"backend auto -> {used}", *sel.notes]
    if choice is not None:
        rates = ", ".join(f"{k} {v:.1f}" for k, v in choice.tok_s.items())
        parts.append(f"{'measured (cached)' if choice.cached else 'measured'}: decode tok/s at the default "
                     f"thresholds {rates}")
        if choice.dense_default:
            parts.append("TDA slower than dense here, so the default is dense")
    return "; ".join(parts)


def first_line(text: str) -> str:
    return next((s.strip() for s in str(text).splitlines() if s.strip()), "unknown error")
