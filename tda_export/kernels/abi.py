"""ctypes mirror of cuda/include/tda_kernels.h and loaders for both libraries."""
from __future__ import annotations

import ctypes
import functools
from ctypes import POINTER, c_char_p, c_int, c_int32, c_int64, c_size_t, c_void_p

from ..ops.contract import ACTIVATIONS, DOWN_WEIGHT_FORMATS, DTYPES, QUANT_BLOCK, SCORE_NORMS, WEIGHT_FORMATS, \
    X_FORMATS
from . import build

TDA_OK = 0
ABI_VERSION = 7  # TDA_KERNELS_ABI_VERSION of the header this file mirrors
MAX_BATCH = 64
WORKSPACE_ALIGNMENT = 256
SIZE_MULTIPLE = 8
QUANT_BLOCK_SIZE = QUANT_BLOCK  # TDA_QUANT_BLOCK

# Enum values are the contract's list positions (a test checks the header agrees).
DTYPE_CODE = {name: i for i, name in enumerate(DTYPES)}
ACTIVATION_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
SCORE_NORM_CODE = {name: i for i, name in enumerate(SCORE_NORMS)}
WEIGHT_FORMAT_CODE = {name: i for i, name in enumerate(WEIGHT_FORMATS)}
DOWN_WEIGHT_FORMAT_CODE = {name: i for i, name in enumerate(DOWN_WEIGHT_FORMATS)}  # 0 = same
X_FORMAT_CODE = {name: i for i, name in enumerate(X_FORMATS)}  # 0 = x as is


class DecodeArgs(ctypes.Structure):
    _fields_ = [
        ("dtype", c_int), ("activation", c_int),
        ("batch", c_int32), ("hidden", c_int32), ("intermediate", c_int32), ("deterministic", c_int32),
        ("hidden_states", c_void_p), ("gate_up_weight", c_void_p), ("down_weight_t", c_void_p),
        ("active_idx", c_void_p), ("active_count", c_void_p), ("output", c_void_p),
        ("version", c_int32), ("weight_format", c_int32), ("down_weight_format", c_int32),
        ("x_format", c_int32),
    ]


# tda_decode_args_t.version: 0 = the library's default (v1 unless $TDA_DECODE_VERSION=2)
DECODE_VERSIONS = (0, 1, 2)


class SelectArgs(ctypes.Structure):
    _fields_ = [
        ("batch", c_int32), ("intermediate", c_int32),
        ("scores", c_void_p), ("threshold", c_void_p), ("active_idx", c_void_p), ("active_count", c_void_p),
        ("density_bounds", c_void_p),
    ]


class PrefillArgs(ctypes.Structure):
    _fields_ = [
        ("dtype", c_int), ("score_norm", c_int),
        ("batch", c_int32), ("seq_len", c_int32), ("intermediate", c_int32),
        ("z", c_void_p), ("token_valid", c_void_p), ("scores_in", c_void_p), ("scores_out", c_void_p),
    ]


class BlockLinearArgs(ctypes.Structure):
    """tda_block_linear_args_t (ABI 5): y[:, n_begin:n_end] = x . dequant(weight)^T."""
    _fields_ = [
        ("weight_format", c_int32), ("m", c_int32), ("n", c_int32), ("k", c_int32),
        ("n_begin", c_int32), ("n_end", c_int32), ("ldx", c_int64), ("ldy", c_int64),
        ("x", c_void_p), ("weight", c_void_p), ("y", c_void_p), ("x_format", c_int32),
    ]


class KernelError(RuntimeError):
    def __init__(self, lib: "Library", fn: str, status: int):
        self.status = status
        super().__init__(f"{fn} ({lib.backend}): status {status}: {lib.status_string(status)}")


class Library:
    """One loaded implementation of tda_kernels.h (CPU or CUDA)."""

    def __init__(self, path):
        self.path = str(path)
        lib = ctypes.CDLL(self.path)
        for name, args in (("tda_sparse_gated_mlp_decode", DecodeArgs), ("tda_select_active", SelectArgs),
                           ("tda_prefill_scores", PrefillArgs), ("tda_block_linear", BlockLinearArgs)):
            size_fn = getattr(lib, f"{name}_workspace_size")
            size_fn.argtypes, size_fn.restype = [POINTER(args)], c_size_t
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [POINTER(args), c_void_p, c_size_t, c_void_p], c_int
        lib.tda_block_dequantize.argtypes = [c_int32, c_int32, c_int64, c_void_p, c_void_p, c_int64, c_void_p]
        lib.tda_block_dequantize.restype = c_int
        lib.tda_block_bytes.argtypes, lib.tda_block_bytes.restype = [c_int32], c_size_t
        lib.tda_status_string.argtypes, lib.tda_status_string.restype = [c_int], c_char_p
        lib.tda_backend.restype = c_char_p
        lib.tda_abi_version.restype = c_int
        self._lib = lib
        self.backend = lib.tda_backend().decode()
        self.abi_version = lib.tda_abi_version()
        if self.abi_version != ABI_VERSION:  # a struct layout mismatch would read garbage, not fail
            raise OSError(f"{self.path}: kernel ABI version {self.abi_version}, this tda-export needs {ABI_VERSION}; "
                          f"rebuild the library")

    def status_string(self, status: int) -> str:
        return self._lib.tda_status_string(status).decode()

    def workspace_size(self, fn: str, args) -> int:
        return getattr(self._lib, f"{fn}_workspace_size")(ctypes.byref(args))

    def call(self, fn: str, args, workspace: int, workspace_size: int, stream: int = 0) -> None:
        """Run `fn`; raises KernelError on a non-OK status."""
        status = getattr(self._lib, fn)(ctypes.byref(args), workspace, workspace_size, stream)
        if status != TDA_OK:
            raise KernelError(self, fn, status)

    def call_status(self, fn: str, args, workspace: int, workspace_size: int, stream: int = 0) -> int:
        return getattr(self._lib, fn)(ctypes.byref(args), workspace, workspace_size, stream)

    def block_dequantize_status(self, weight_format: int, k: int, rows: int, weight: int, out: int, ldo: int,
                                stream: int = 0) -> int:
        return self._lib.tda_block_dequantize(weight_format, k, rows, weight, out, ldo, stream)

    def block_bytes(self, weight_format: int) -> int:
        return self._lib.tda_block_bytes(weight_format)


@functools.lru_cache(maxsize=None)
def cpu_library() -> Library:
    return Library(build.build_cpu())


@functools.lru_cache(maxsize=None)
def cuda_library() -> Library:
    return Library(build.build_cuda())


__all__ = ["DecodeArgs", "SelectArgs", "PrefillArgs", "BlockLinearArgs", "Library", "KernelError", "cpu_library", "cuda_library",
           "DTYPE_CODE", "ACTIVATION_CODE", "SCORE_NORM_CODE", "WEIGHT_FORMAT_CODE", "MAX_BATCH", "SIZE_MULTIPLE"]
