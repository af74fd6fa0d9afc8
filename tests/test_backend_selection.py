"""Which backend Engine.load takes (runtime/selection.py): the rule's table with plain values, no torch,
no compiler; and on a real engine, that auto says in one line on stderr when the native runtime cannot run
and which backend it took instead."""
import warnings

import pytest
from click.testing import CliRunner

from tda_export.runtime.choose import Choice
from tda_export.runtime.selection import (MEASURE, SETUP, Request, Selection, native_unusable_reason, report_line,
                                          select)

FP32 = {"weights_file": "model.safetensors", "dtype": "float32"}
BUILD_LOG = "the native runtime cannot be built: nlohmann/json.hpp not found\n-- CMake log line 2\n-- line 3"


class Facts:
    """The machine, as select asks about it; remembers what was asked."""

    def __init__(self, cuda=False, native=None):
        self._cuda, self._native, self.asked = cuda, native, []

    def cuda(self):
        self.asked.append("cuda")
        return self._cuda

    def native(self):
        self.asked.append("native")
        return self._native


def pick(backend="auto", machine=None, **request):
    machine = machine or Facts()
    return select(Request(backend, **request), machine.cuda, machine.native), machine.asked


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "native", "tensorrt"])
def test_explicit_backend_is_honoured_without_asking_the_machine(backend):
    sel, asked = pick(backend, Facts(cuda=True, native="no compiler"), device="cpu")
    assert sel == Selection(backend, "cpu") and asked == []  # never builds the native runtime it was not asked for
    assert report_line(sel, backend) is None


def test_cpu_fp32_is_native_and_silent():
    sel, asked = pick(device="cpu")
    assert sel.backend == "native" and sel.notes == () and asked == ["native"]  # device=cpu: no GPU probe
    assert report_line(sel, "native") is None


def test_no_gpu_is_native_without_a_note():
    sel, asked = pick(machine=Facts(cuda=False))
    assert sel.backend == "native" and sel.notes == () and asked == ["cuda", "native"]


def test_gpu_is_torch():
    sel, asked = pick(machine=Facts(cuda=True, native="unused"))
    assert sel == Selection("torch", None, (), auto=True) and asked == ["cuda"]
    assert report_line(sel, "torch") is None


def test_gpu_with_broken_kernels_says_so_and_uses_the_cpu():
    sel, _ = pick(machine=Facts(cuda="nvcc failed\nkernel.cu(3): error"))
    assert sel.backend == "native"
    line = report_line(sel, "native")
    assert line.startswith("backend auto -> native; not torch on the GPU") and "nvcc failed" in line
    assert "\n" not in line and "kernel.cu" not in line


def test_native_unusable_falls_back_and_says_why_in_one_line():
    sel, asked = pick(machine=Facts(native=BUILD_LOG), device="cpu")
    assert sel.backend == MEASURE and sel.device == "cpu" and asked == ["native"]
    line = report_line(sel, "torch", Choice("torch", False, {"torch": 14.7, "onnxruntime": 12.0,
                                                             "onnxruntime_dense": 11.0}))
    assert "\n" not in line and "CMake log" not in line
    assert line.startswith("backend auto -> torch; not native: the native runtime cannot be built: nlohmann")
    assert f"`{SETUP}`" in line and "torch 14.7" in line


def test_setup_hint_is_not_repeated():
    why = f"nlohmann/json.hpp not found; run `{SETUP}` or `sudo apt-get install -y nlohmann-json3-dev`"
    sel, _ = pick(machine=Facts(native=why), device="cpu")
    assert report_line(sel, "onnxruntime").count(SETUP) == 1


@pytest.mark.parametrize("data, expect", [
    (dict(FP32, dtype="bfloat16"), "runs float32 engines, this one is bfloat16"),
    ({"dtype": "float32"}, "built before model.safetensors"),
    (dict(FP32, weight_formats={"embed_tokens.weight_blocks": "q4_k", "x": "float32"}), "not q4_k"),
])
def test_engine_native_cannot_run_measures_without_building(data, expect):
    reason = native_unusable_reason(data)
    assert expect in reason
    sel, asked = pick(device="cpu", native_reason=reason, machine=Facts(native="would build"))
    assert sel.backend == MEASURE and asked == []  # decided from the manifest: no build attempted
    assert sel.notes == (f"not native: {reason}",)
    assert native_unusable_reason(FP32) is None
    for fmt in ("q8_0", "q4_0", "q4_1"):  # the block formats it reads
        assert native_unusable_reason(dict(FP32, weight_formats={"a": fmt, "b": "float32"})) is None


def test_native_turned_off():
    sel, asked = pick(device="cpu", native_off=True)
    assert sel.backend == MEASURE and asked == [] and "TDA_EXPORT_NATIVE=0" in sel.notes[0]


def test_engine_without_decoder_spec_runs_on_onnxruntime():
    sel, asked = pick(decoder_spec=False, machine=Facts(cuda=True))
    assert sel.backend == "onnxruntime" and asked == []
    assert "decoder_spec" in report_line(sel, "onnxruntime")


def test_measured_choice_is_reported():
    sel = Selection(MEASURE, "cpu", (), auto=True)
    line = report_line(sel, "onnxruntime", Choice("onnxruntime", True, {"torch": 1.0, "onnxruntime": 2.0,
                                                                        "onnxruntime_dense": 3.0}, cached=True))
    assert line == ("backend auto -> onnxruntime; measured (cached): decode tok/s at the default thresholds "
                    "torch 1.0, onnxruntime 2.0, onnxruntime_dense 3.0; TDA slower than dense here, so the "
                    "default is dense")


def _no_native(monkeypatch, message):
    """The native runtime fails as a machine without its packages makes it fail, and there is no GPU."""
    from tda_export.native import NativeBuildError
    from tda_export.runtime import adapters

    monkeypatch.setattr(adapters, "_open_native", lambda *a: NativeBuildError(message))
    monkeypatch.setattr(adapters.Machine, "cuda", lambda self: False)


def test_run_says_in_one_line_which_backend_and_why_not_native(served_engine_dir, monkeypatch, tmp_path):
    from tda_export.cli import main

    monkeypatch.setenv("TDA_EXPORT_CACHE", str(tmp_path))
    _no_native(monkeypatch, BUILD_LOG)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*native.*")  # no UserWarning machinery
        r = CliRunner().invoke(main, ["run", "-e", str(served_engine_dir), "-p", "hello", "-n", "2"])
    assert r.exit_code == 0, r.output
    said = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(said) == 2, r.stderr  # the fallback, and run's closing line naming the backend
    used = said[1].rsplit("backend ", 1)[1].rstrip("]")
    assert used in ("torch", "onnxruntime")
    assert said[0].startswith(f"backend auto -> {used}; not native: the native runtime cannot be built")
    assert "CMake" not in r.stderr and "Traceback" not in r.stderr and SETUP in said[0]


def test_explicit_native_that_cannot_build_is_an_error(served_engine_dir, monkeypatch):
    from tda_export.runtime.engine import Engine, EngineError

    _no_native(monkeypatch, BUILD_LOG)
    with pytest.raises(EngineError, match="native backend: the native runtime cannot be built"):
        Engine.load(served_engine_dir, backend="native", report=None)
