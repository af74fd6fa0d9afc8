"""ctypes binding of plugins/tda_plugin_capi.cpp: the C++ plugins' decisions (tda_plugin_logic.h),
compiled with g++ on demand, for the Python plugins to call.

One implementation serves both plugin realizations: the Python plugins never decide a shape,
type, format, field or workspace themselves. The library is cached under
``$TDA_KERNELS_CACHE/../trt-logic/<hash of sources and flags>/`` like the kernel libraries.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from ctypes import POINTER, byref, c_bool, c_char_p, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path
from typing import NamedTuple

from ..kernels.abi import DecodeArgs, PrefillArgs, SelectArgs

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
SOURCES = (PLUGINS / "tda_plugin_capi.cpp", PLUGINS / "tda_plugin_logic.h", ROOT / "cuda" / "include" / "tda_kernels.h",
           ROOT / "cuda" / "src" / "decode_version.h")
FLAGS = ["-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]

# tda_trt::DType (INT8: packed block weights)
FLOAT, HALF, BF16, INT32, OTHER, INT8 = range(6)
DTYPE_CODE = {"float32": FLOAT, "float16": HALF, "bfloat16": BF16, "int32": INT32, "int8": INT8}
MLP, SELECT = 0, 1
MLP_NB_IN, SELECT_NB_IN = 7, 2


class MlpAttrs(NamedTuple):
    """A SparseGatedMLP plugin's parsed fields, as C ABI codes (tda_trt::MlpAttrs)."""
    activation: int
    score_norm: int
    decode_version: int  # tda_decode_args_t.version the plan was built for; never 0
    weight_format: int = 0  # tda_weight_format_t of gate_up_weight / down_weight_t (0: in T)
    down_weight_format: int = 0  # down_weight_t's own tda_weight_format_t (0: "same" as weight_format)
    x_format: int = 0  # tda_x_format_t: how gate/up read hidden_states (0: as is; 1: q8_0, CPU kernel library only)


class LogicError(ValueError):
    """A decision of the plugin logic said no; the message names the tensor or field."""


class Gemm(ctypes.Structure):
    _fields_ = [("trans_a", c_bool), ("trans_b", c_bool), ("m", c_int32), ("n", c_int32), ("k", c_int32),
                ("a", c_void_p), ("lda", c_int32), ("b", c_void_p), ("ldb", c_int32), ("c", c_void_p),
                ("ldc", c_int32)]


class PrefillPlan(ctypes.Structure):
    _fields_ = [("gate_up_gemm", Gemm), ("gate_up", c_void_p), ("z", c_void_p), ("tokens", c_int64),
                ("scores", PrefillArgs), ("scores_ws", c_void_p), ("scores_ws_bytes", c_size_t),
                ("down_gemm", Gemm), ("cublas_ws", c_void_p), ("cublas_ws_bytes", c_size_t),
                ("weight_format", c_int32), ("down_weight_format", c_int32), ("gate_up_t", c_void_p),
                ("down_t", c_void_p), ("x_format", c_int32), ("xq", c_void_p)]


class MlpBuffers(ctypes.Structure):
    _fields_ = [(n, c_void_p) for n in ("hidden", "gate_up", "down_t", "active_idx", "active_count", "token_valid",
                                        "scores_in", "output", "scores_out")]


class KernelQueries(ctypes.Structure):
    _fields_ = [("decode", c_void_p), ("prefill_scores", c_void_p), ("select", c_void_p)]


def _cache_dir(flags: list[str]) -> Path:
    h = hashlib.sha256()
    for f in SOURCES:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(flags).encode())
    base = Path(os.environ.get("TDA_KERNELS_CACHE", Path.home() / ".cache" / "tda-export" / "kernels")).parent
    return base / "trt-logic" / h.hexdigest()[:16]


def build_logic() -> Path:
    """Path of libtda_trt_logic.so, compiled with g++ if not cached (about 2 s)."""
    cxx = os.environ.get("CXX", "g++")
    out_dir = _cache_dir([cxx] + FLAGS)
    lib = out_dir / "libtda_trt_logic.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{PLUGINS}", f"-I{ROOT / 'cuda' / 'include'}", f"-I{ROOT / 'cuda' / 'src'}", str(SOURCES[0]),
           "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, lib)  # concurrent builders never see a half-written library
    return lib


NB_ATTRS = len(MlpAttrs._fields)  # tda_trt_mlp_nb_attrs(): checked when the library loads


def _attrs(attrs: MlpAttrs):
    return (c_int32 * NB_ATTRS)(*attrs)


def _dims(shapes) -> tuple:
    shapes = [tuple(int(d) for d in s) for s in shapes]
    ranks = (c_int32 * max(1, len(shapes)))(*[len(s) for s in shapes])
    flat = (c_int64 * (8 * max(1, len(shapes))))()
    for i, s in enumerate(shapes):
        for k, d in enumerate(s[:8]):
            flat[8 * i + k] = d
    return len(shapes), ranks, flat


class Logic:
    """The plugin decisions; every method is one function of tda_plugin_logic.h."""

    def __init__(self, path: Path | None = None):
        lib = ctypes.CDLL(str(path or build_logic()))
        i64p, i32p, errp = POINTER(c_int64), POINTER(c_int32), c_char_p
        sig = {
            "tda_trt_err_len": ([], c_size_t), "tda_trt_sizeof_prefill_plan": ([], c_size_t),
            "tda_trt_sizeof_mlp_buffers": ([], c_size_t), "tda_trt_identity": ([c_int32], c_char_p),
            "tda_trt_mlp_nb_fields": ([], c_int32), "tda_trt_mlp_nb_attrs": ([], c_int32),
            "tda_trt_build_decode_version": ([], c_int32), "tda_trt_mlp_field_name": ([c_int32], c_char_p),
            "tda_trt_mlp_parse_fields": ([c_int32, POINTER(c_char_p), POINTER(c_void_p), i32p, i32p, c_int32, i32p,
                                          errp], c_int),
            "tda_trt_mlp_check_backend": ([i32p, c_char_p, errp], c_int),
            "tda_trt_select_parse_fields": ([c_int32, POINTER(c_char_p), POINTER(c_void_p), i32p, i32p, errp], c_int),
            "tda_trt_mlp_field_value": ([c_int32, i32p], c_char_p),
            "tda_trt_mlp_check_shapes": ([c_int32, i32p, i64p, c_int32, c_int32, i64p, errp], c_int),
            "tda_trt_mlp_max_sizes": ([c_int32, i32p, i64p, c_int32, c_int32, i64p, errp], c_int),
            "tda_trt_select_check_shapes": ([c_int32, i32p, i64p, i64p, errp], c_int),
            "tda_trt_output_shape": ([c_int32, c_int32, i32p], c_int32),
            "tda_trt_output_types": ([c_int32, c_int32, i32p, i32p, errp], c_int),
            "tda_trt_supports": ([c_int32, c_int32, i32p, i32p, c_int32], c_int),
            "tda_trt_mlp_workspace_size": ([c_int32, i32p, i64p, c_int64, POINTER(KernelQueries)], c_size_t),
            "tda_trt_select_workspace_size": ([c_int64, c_int64, POINTER(KernelQueries)], c_size_t),
            "tda_trt_mlp_is_decode": ([c_int64], c_int), "tda_trt_chunk_batch": ([c_int64, c_int64], c_int64),
            "tda_trt_mlp_decode_call": ([c_int32, i32p, i64p, c_int64, c_int64, POINTER(MlpBuffers),
                                         POINTER(KernelQueries), POINTER(DecodeArgs)], c_size_t),
            "tda_trt_mlp_prefill_plan": ([c_int32, i32p, i64p, POINTER(MlpBuffers), c_void_p,
                                          POINTER(KernelQueries), POINTER(PrefillPlan), errp], c_int),
            "tda_trt_select_args": ([c_int64, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                                     POINTER(SelectArgs)], None),
        }
        for name, (args, res) in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        self._lib = lib
        self._err_len = lib.tda_trt_err_len()
        # The ctypes mirrors must have the C++ layout; a mismatch would corrupt enqueue's arguments.
        assert ctypes.sizeof(PrefillPlan) == lib.tda_trt_sizeof_prefill_plan(), "PrefillPlan layout"
        assert ctypes.sizeof(MlpBuffers) == lib.tda_trt_sizeof_mlp_buffers(), "MlpBuffers layout"
        assert lib.tda_trt_mlp_nb_attrs() == NB_ATTRS, "MlpAttrs layout"
        self.namespace, self.version, self.mlp_name, self.select_name = (
            lib.tda_trt_identity(i).decode() for i in range(4))
        self.mlp_fields = tuple(lib.tda_trt_mlp_field_name(i).decode() for i in range(lib.tda_trt_mlp_nb_fields()))

    def _call(self, fn, *args) -> None:
        err = ctypes.create_string_buffer(self._err_len)
        if fn(*args, err):
            raise LogicError(err.value.decode())

    # ---- fields: a field is (name, bytes, is_char) ----
    @staticmethod
    def _fields(fields):
        fields = list(fields)
        n = max(1, len(fields))
        keep = [ctypes.create_string_buffer(data, len(data)) if data else None for _, data, _ in fields]
        names = (c_char_p * n)(*[name.encode() for name, _, _ in fields])
        data = (c_void_p * n)(*[ctypes.cast(k, c_void_p) if k is not None else None for k in keep])
        lengths = (c_int32 * n)(*[len(d) for _, d, _ in fields])
        is_char = (c_int32 * n)(*[int(c) for _, _, c in fields])
        return len(fields), names, data, lengths, is_char, keep

    def parse_mlp_fields(self, fields, building: bool) -> MlpAttrs:
        """building: TensorRT's BUILD phase (an absent decode_version is then the build process's default,
        else 1). Raises LogicError naming a bad field or value."""
        nb, names, data, lengths, is_char, _keep = self._fields(fields)
        out = (c_int32 * NB_ATTRS)()
        self._call(self._lib.tda_trt_mlp_parse_fields, nb, names, data, lengths, is_char, int(building), out)
        return MlpAttrs(*out)

    def mlp_check_backend(self, attrs: MlpAttrs, backend: str) -> None:
        """Raises LogicError naming a field the kernel library `backend` (its tda_backend(): "cuda", "cpu")
        does not run: x_format q8_0 runs on the CPU library only."""
        self._call(self._lib.tda_trt_mlp_check_backend, _attrs(attrs), backend.encode())

    def parse_select_fields(self, fields) -> None:
        nb, names, data, lengths, is_char, _keep = self._fields(fields)
        self._call(self._lib.tda_trt_select_parse_fields, nb, names, data, lengths, is_char)

    def build_decode_version(self) -> int:
        """The decode_version a plan built in this process records ($TDA_DECODE_VERSION, else 1)."""
        return self._lib.tda_trt_build_decode_version()

    def mlp_serialized_fields(self, attrs: MlpAttrs) -> list[tuple[str, bytes]]:
        """(name, bytes) as the C++ plugin serializes them: the value string plus its NUL."""
        return [(name, self._lib.tda_trt_mlp_field_value(i, _attrs(attrs)) + b"\0")
                for i, name in enumerate(self.mlp_fields)]

    # ---- shapes and types ----
    def mlp_check_shapes(self, shapes, weight_format: int = 0,
                         down_weight_format: int = 0) -> tuple[int, int, int, int]:
        """(B, S, H, I), -1 where unknown; shapes use -1 for unknown dims. weight_format, down_weight_format: the
        plugin's (block weights' last axes are H/32 blocks of bytes of their format; down 0 = same)."""
        out = (c_int64 * 4)()
        self._call(self._lib.tda_trt_mlp_check_shapes, *_dims(shapes), weight_format, down_weight_format, out)
        return tuple(out)

    def mlp_max_sizes(self, max_shapes, weight_format: int = 0,
                      down_weight_format: int = 0) -> tuple[int, int, int, int]:
        """(B, S, H, I) bounds of a profile from every input's max shape."""
        out = (c_int64 * 4)()
        self._call(self._lib.tda_trt_mlp_max_sizes, *_dims(max_shapes), weight_format, down_weight_format, out)
        return tuple(out)

    def select_check_shapes(self, shapes) -> tuple[int, int]:
        out = (c_int64 * 2)()
        self._call(self._lib.tda_trt_select_check_shapes, *_dims(shapes), out)
        return tuple(out)

    def output_shape(self, op: int, out: int) -> list[tuple[int, int]]:
        """Output `out` of op as (input, dim) references."""
        refs = (c_int32 * 6)()
        nb = self._lib.tda_trt_output_shape(op, out, refs)
        return [(refs[2 * k], refs[2 * k + 1]) for k in range(nb)]

    def output_types(self, op: int, types) -> tuple[int, int]:
        types = list(types)
        arr, out = (c_int32 * max(1, len(types)))(*types), (c_int32 * 2)()
        self._call(self._lib.tda_trt_output_types, op, len(types), arr, out)
        return tuple(out)

    def supports(self, op: int, pos: int, io, weight_format: int = 0) -> bool:
        """io: (dtype code, linear) of positions 0..pos; weight_format: SparseGatedMLP's."""
        io = list(io)[:pos + 1]
        types = (c_int32 * len(io))(*[t for t, _ in io])
        linear = (c_int32 * len(io))(*[int(l) for _, l in io])
        return bool(self._lib.tda_trt_supports(op, pos, types, linear, weight_format))

    # ---- workspace and launches ----
    def mlp_workspace_size(self, dtype: int, attrs: MlpAttrs, max_sizes, min_seq: int,
                           queries: KernelQueries) -> int:
        return self._lib.tda_trt_mlp_workspace_size(dtype, _attrs(attrs), (c_int64 * 4)(*max_sizes), min_seq,
                                                    byref(queries))

    def select_workspace_size(self, max_batch: int, inter: int, queries: KernelQueries) -> int:
        return self._lib.tda_trt_select_workspace_size(max_batch, inter, byref(queries))

    def is_decode(self, seq: int) -> bool:
        return bool(self._lib.tda_trt_mlp_is_decode(seq))

    def chunks(self, batch: int):
        """(b0, nb) batch chunks of at most the ABI's TDA_MAX_BATCH."""
        b0 = 0
        while b0 < batch:
            nb = self._lib.tda_trt_chunk_batch(batch, b0)
            yield b0, nb
            b0 += nb

    def decode_call(self, dtype, attrs: MlpAttrs, sizes, b0, nb, buffers: MlpBuffers,
                    queries: KernelQueries) -> tuple[DecodeArgs, int]:
        """One decode chunk: (arguments with the plan's decode version, workspace bytes to pass)."""
        out = DecodeArgs()
        nbytes = self._lib.tda_trt_mlp_decode_call(dtype, _attrs(attrs), (c_int64 * 4)(*sizes), b0, nb,
                                                   byref(buffers), byref(queries), byref(out))
        return out, nbytes

    def prefill_plan(self, dtype, attrs: MlpAttrs, sizes, buffers: MlpBuffers, workspace: int,
                     queries: KernelQueries) -> PrefillPlan:
        out = PrefillPlan()
        self._call(self._lib.tda_trt_mlp_prefill_plan, dtype, _attrs(attrs), (c_int64 * 4)(*sizes),
                   byref(buffers), workspace, byref(queries), byref(out))
        return out

    def select_args(self, inter, b0, nb, scores, threshold, density_bounds, idx, count) -> SelectArgs:
        out = SelectArgs()
        self._lib.tda_trt_select_args(inter, b0, nb, scores, threshold, density_bounds, idx, count, byref(out))
        return out


@functools.lru_cache(maxsize=None)
def logic() -> Logic:
    return Logic()


def kernel_queries(library) -> KernelQueries:
    """The workspace queries of a loaded kernel library (tda_export.kernels.abi.Library)."""
    lib = library._lib
    addr = lambda name: ctypes.cast(getattr(lib, f"{name}_workspace_size"), c_void_p).value  # noqa: E731
    return KernelQueries(addr("tda_sparse_gated_mlp_decode"), addr("tda_prefill_scores"), addr("tda_select_active"))
