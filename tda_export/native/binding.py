"""ctypes binding of the C API (cpp/include/tda/runtime.h) and the `native` backend on top of it.

The backend keeps runtime/backend.py's interface, so the generation loop, `run`, `serve` and
`bench` drive the C++ executor exactly as they drive ONNX Runtime.
"""
from __future__ import annotations

import ctypes as C
from pathlib import Path

import numpy as np

from ..ops.contract import NO_CLAMP
from .build import build_native
from .threads import pool_environment

_I32, _I64, _F32 = np.int32, np.int64, np.float32


class NativeError(RuntimeError):
    """A C API call failed; `status` is the tda_rt_status_t, the message the runtime's."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EngineInfo(C.Structure):
    _fields_ = [(n, C.c_int32) for n in ("num_layers", "hidden_size", "intermediate_size", "vocab_size",
                                           "max_context", "bos_token_id", "eos_token_id", "pad_token_id")] + \
               [("weight_bytes", C.c_int64), ("mlp_weight_bytes", C.c_int64)]


_lib = None


def library() -> C.CDLL:
    global _lib
    if _lib is None:
        pool_environment()  # one pool: cpp/include/tda/runtime.h "Threads"
        lib = C.CDLL(str(build_native().library))
        P, i32, f32p, i64p = C.c_void_p, C.c_int32, C.POINTER(C.c_float), C.POINTER(C.c_int64)
        i32p = C.POINTER(C.c_int32)
        sigs = {
            "tda_rt_last_error": ([], C.c_char_p),
            "tda_rt_engine_open": ([C.c_char_p, C.c_int, C.c_int, C.POINTER(P)], C.c_int),
            "tda_rt_engine_close": ([P], None),
            "tda_rt_engine_info_get": ([P, C.POINTER(EngineInfo)], C.c_int),
            "tda_rt_engine_thresholds": ([P, C.c_double, i32, f32p], C.c_int),
            "tda_rt_engine_density_bounds": ([P, C.c_double, f32p], C.c_int),
            "tda_rt_session_new": ([P, C.POINTER(P)], C.c_int),
            "tda_rt_session_free": ([P], None),
            "tda_rt_prefill": ([P, i32, i32, i64p, i64p, f32p, f32p], C.c_int),
            "tda_rt_prefill_bounded": ([P, i32, i32, i64p, i64p, f32p, f32p, f32p], C.c_int),
            "tda_rt_decode": ([P, i64p, f32p], C.c_int),
            "tda_rt_active_counts": ([P, C.POINTER(C.c_int32)], C.c_int),
            "tda_rt_copy_bandwidth": ([C.c_int64, i32], C.c_double),
            "tda_rt_join": ([P, i32, i32, i32p, i64p, i64p, f32p, f32p, f32p], C.c_int),
            "tda_rt_step": ([P, i32, i32p, i64p, f32p], C.c_int),
            "tda_rt_release": ([P, i32], C.c_int),
            "tda_rt_slot_active_counts": ([P, i32, i32p], C.c_int),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _lib = lib
    return _lib


def copy_bandwidth(nbytes: int = 0, repeats: int = 0) -> float:
    """Bytes/s of the runtime's one copy probe (tda_rt_copy_bandwidth: best of single-thread memcpys of
    512 MiB by default, read + write), the bandwidth every "% of floor" divides by."""
    return float(library().tda_rt_copy_bandwidth(int(nbytes), int(repeats)))


def _check(status: int) -> None:
    if status != 0:
        raise NativeError(status, library().tda_rt_last_error().decode(errors="replace"))


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(C.POINTER(ctype))


class NativeEngine:
    """An opened engine directory (verified manifest, mmapped weights)."""

    def __init__(self, directory: Path, verify: bool = True, threads: int | None = None):
        lib = library()
        self._h = C.c_void_p()
        _check(lib.tda_rt_engine_open(str(directory).encode(), int(verify), int(threads or 0), C.byref(self._h)))
        self.info = EngineInfo()
        _check(lib.tda_rt_engine_info_get(self._h, C.byref(self.info)))

    def thresholds(self, density: float | None, prompt_len: int | None) -> np.ndarray:
        out = np.zeros(self.info.num_layers, _F32)
        _check(library().tda_rt_engine_thresholds(self._h, float(density or 0.0), int(prompt_len or 0),
                                                  _ptr(out, C.c_float)))
        return out

    def density_bounds(self, density: float | None) -> np.ndarray:
        out = np.zeros((self.info.num_layers, 2), _F32)
        _check(library().tda_rt_engine_density_bounds(self._h, float(density or 0.0), _ptr(out, C.c_float)))
        return out

    def __del__(self):
        if getattr(self, "_h", None) and _lib is not None:
            _lib.tda_rt_engine_close(self._h)
            self._h = None


class _Session:
    def __init__(self, engine: NativeEngine):
        self.engine = engine  # keeps the engine alive as long as a session uses it
        self.h = C.c_void_p()
        _check(library().tda_rt_session_new(engine._h, C.byref(self.h)))
        self.batch = 0

    def __del__(self):
        if getattr(self, "h", None) and _lib is not None:
            _lib.tda_rt_session_free(self.h)
            self.h = None


class NativeBackend:
    """runtime/backend.py's interface over the C++ CPU executor."""

    name = "native"

    def __init__(self, directory: Path, manifest: dict, threads: int | None = None, verify: bool = False):
        # Engine.load verified the manifest already; verify=True re-hashes in C++ (tda-run does)
        self.engine = NativeEngine(directory, verify, threads)
        self.manifest = manifest
        self.max_context = self.engine.info.max_context

    def _bounds(self, density_bounds, rows: int | None) -> np.ndarray:
        """[L, 2] (or [rows, L, 2]) float32; None: no clamp, as elsewhere."""
        L = self.engine.info.num_layers
        shape = (L, 2) if rows is None else (rows, L, 2)
        bounds = (np.broadcast_to(np.asarray(NO_CLAMP, _F32), shape) if density_bounds is None
                  else np.asarray(density_bounds, _F32))
        if bounds.shape != shape:
            raise ValueError(f"density_bounds must have shape {shape}, got {bounds.shape}")
        return np.ascontiguousarray(bounds)

    def prefill(self, input_ids, attention_mask, thresholds, density_bounds=None):
        ids = np.ascontiguousarray(input_ids, _I64)
        mask = np.ascontiguousarray(attention_mask, _I64)
        ths = np.ascontiguousarray(thresholds, _F32)
        if ths.shape != (self.engine.info.num_layers,):
            raise ValueError(f"thresholds must have shape ({self.engine.info.num_layers},), got {ths.shape}")
        bounds = self._bounds(density_bounds, None)
        s = _Session(self.engine)
        B, S = ids.shape
        logits = np.empty((B, self.engine.info.vocab_size), _F32)
        _check(library().tda_rt_prefill_bounded(s.h, B, S, _ptr(ids, C.c_int64), _ptr(mask, C.c_int64),
                                                _ptr(ths, C.c_float), _ptr(bounds, C.c_float),
                                                _ptr(logits, C.c_float)))
        s.batch = B
        return logits, s

    def decode(self, state: _Session, tokens):
        toks = np.ascontiguousarray(tokens, _I64)
        if toks.shape != (state.batch,):
            raise ValueError(f"tokens must have shape ({state.batch},), got {toks.shape}")
        logits = np.empty((state.batch, self.engine.info.vocab_size), _F32)
        _check(library().tda_rt_decode(state.h, _ptr(toks, C.c_int64), _ptr(logits, C.c_float)))
        return logits

    def active_counts(self, state: _Session):
        out = np.empty((self.engine.info.num_layers, state.batch), _I32)
        _check(library().tda_rt_active_counts(state.h, _ptr(out, C.c_int32)))
        return out

    # --- continuous batching (runtime/backend.py SlotBackend; cpp/include/tda/runtime.h tda_rt_join) ---
    max_slots = 64  # TDA_RT_MAX_SLOTS

    def open_slots(self) -> _Session:
        return _Session(self.engine)

    def join(self, state: _Session, slots, input_ids, attention_mask, thresholds, density_bounds=None):
        ids = np.ascontiguousarray(input_ids, _I64)
        mask = np.ascontiguousarray(attention_mask, _I64)
        n, S = ids.shape
        sl = np.ascontiguousarray(slots, _I32)
        L = self.engine.info.num_layers
        ths = np.ascontiguousarray(thresholds, _F32)
        if sl.shape != (n,) or ths.shape != (n, L) or mask.shape != ids.shape:
            raise ValueError(f"join: slots {sl.shape}, input_ids {ids.shape}, attention_mask {mask.shape} and "
                             f"thresholds {ths.shape} disagree (want ({n},), [n, S], [n, S], ({n}, {L}))")
        bounds = self._bounds(density_bounds, n)
        logits = np.empty((n, self.engine.info.vocab_size), _F32)
        _check(library().tda_rt_join(state.h, n, S, _ptr(sl, C.c_int32), _ptr(ids, C.c_int64), _ptr(mask, C.c_int64),
                                     _ptr(ths, C.c_float), _ptr(bounds, C.c_float), _ptr(logits, C.c_float)))
        return logits

    def step(self, state: _Session, slots, tokens):
        sl = np.ascontiguousarray(slots, _I32)
        toks = np.ascontiguousarray(tokens, _I64)
        if toks.shape != sl.shape or sl.ndim != 1:
            raise ValueError(f"step: slots {sl.shape} and tokens {toks.shape} must be equal 1-d shapes")
        logits = np.empty((sl.size, self.engine.info.vocab_size), _F32)
        _check(library().tda_rt_step(state.h, sl.size, _ptr(sl, C.c_int32), _ptr(toks, C.c_int64),
                                     _ptr(logits, C.c_float)))
        return logits

    def release(self, state: _Session, slot: int) -> None:
        _check(library().tda_rt_release(state.h, int(slot)))

    def slot_active_counts(self, state: _Session, slot: int) -> np.ndarray:
        out = np.empty(self.engine.info.num_layers, _I32)
        _check(library().tda_rt_slot_active_counts(state.h, int(slot), _ptr(out, C.c_int32)))
        return out
