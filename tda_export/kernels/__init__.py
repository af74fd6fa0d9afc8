"""Native TDA kernels (cuda/): C ABI loaders, on-demand builds and torch ops.

``import tda_export.kernels`` registers the ``tda_kernels::`` torch ops; the
libraries themselves are compiled lazily on first use (see build.py).
"""
from .abi import KernelError, Library, cpu_library, cuda_library
from .build import BuildError, build_cpu, build_cuda, compile_check_cuda
from .torch_ops import prefill_scores, select_active, sparse_gated_mlp_decode

__all__ = ["KernelError", "Library", "cpu_library", "cuda_library", "BuildError", "build_cpu", "build_cuda",
           "compile_check_cuda", "prefill_scores", "select_active", "sparse_gated_mlp_decode"]
