"""The C++ runtime (cpp/) from Python: built on demand (build.py), bound through its C API (binding.py)."""
from .build import NativeBuildError, build_native

__all__ = ["NativeBuildError", "build_native"]
