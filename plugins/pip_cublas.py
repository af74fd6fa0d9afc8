"""Print the root of PyPI's cuBLAS for CUDA MAJOR in this Python's environment: the directory holding
include/cublas_v2.h and lib/libcublas.so.MAJOR (nvidia-cublas 13: site-packages/nvidia/cu13;
nvidia-cublas-cu12: site-packages/nvidia/cublas). Prints nothing when none is installed.

plugins/CMakeLists.txt runs it when the CUDA toolkit has no cuBLAS:  python pip_cublas.py MAJOR"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path


def cublas_root(major: str) -> Path | None:
    for name in ("nvidia-cublas", f"nvidia-cublas-cu{major}"):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if f.name == f"libcublas.so.{major}":
                root = Path(dist.locate_file(f)).parent.parent
                if (root / "include" / "cublas_v2.h").is_file():
                    return root
    return None


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python pip_cublas.py CUDA_MAJOR (e.g. 13)")
    root = cublas_root(sys.argv[1])
    if root is not None:
        print(root)
