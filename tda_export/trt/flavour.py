"""Which TensorRT a target means, how to import it, and the environment its build process needs.

`tensorrt-rtx` is NVIDIA's TensorRT for RTX (`tensorrt_rtx`, pip `tensorrt-rtx-cu13`): it builds
plans on a CPU-only machine; plans run on compute capability 7.5/8.0/8.6/8.9/12.x GPUs.
`tensorrt` is datacenter TensorRT (`tensorrt`, pip `tensorrt`): it needs a GPU to build and run.

The library-name trap: TensorRT-RTX's ONNX parser dlopens the unversioned `libtensorrt_rtx.so`
when it adds a plugin layer, but the wheel ships only `libtensorrt_rtx.so.1`; without that name
on LD_LIBRARY_PATH *at process start* the process aborts. So the build runs in a child process
whose LD_LIBRARY_PATH holds a cache directory of unversioned symlinks to the wheel's libraries.
(Preloading the library under that name from Python does not help: the loader matches the
requested name, not the file.)
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Flavour:
    target: str     # the --target value and the manifest's tensorrt.flavour
    module: str     # Python module
    pip: str        # the package a user installs
    builds_on_cpu: bool


FLAVOURS = {
    "tensorrt-rtx": Flavour("tensorrt-rtx", "tensorrt_rtx", "tensorrt-rtx-cu13", True),
    "tensorrt": Flavour("tensorrt", "tensorrt", "tensorrt", False),
}
TARGETS = ("onnx", *FLAVOURS)


class TensorRTMissing(RuntimeError):
    pass


def flavour(target: str) -> Flavour:
    return FLAVOURS[target]


def require(target: str) -> Flavour:
    """The flavour, if its module is installed; else one clear error naming the pip package."""
    f = FLAVOURS[target]
    if importlib.util.find_spec(f.module) is None:
        raise TensorRTMissing(f"--target {target} needs the Python module {f.module!r}, which is not installed: "
                              f"pip install {f.pip}")
    return f


def import_module(target: str):
    return importlib.import_module(require(target).module)


def _libs_dirs(f: Flavour) -> list[Path]:
    out = []
    for name in (f"{f.module}_libs", f.module):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            out += [Path(p) for p in spec.submodule_search_locations]
    return out


def unversioned_links(f: Flavour, cache_root: Path | None = None) -> Path | None:
    """A cache directory of `libX.so -> .../libX.so.N` links for the wheel's libraries (None if none needed)."""
    libs = sorted(p for d in _libs_dirs(f) for p in d.glob("lib*.so.*") if re.fullmatch(r"lib.+\.so\.\d+", p.name))
    if not libs:
        return None
    root = cache_root or Path(os.environ.get("TDA_KERNELS_CACHE",
                                             Path.home() / ".cache" / "tda-export" / "kernels")).parent
    key = hashlib.sha256("\n".join(str(p) for p in libs).encode()).hexdigest()[:16]
    out = root / "trt-libs" / key
    out.mkdir(parents=True, exist_ok=True)
    for lib in libs:
        link = out / lib.name.rsplit(".", 1)[0]
        if link.is_symlink() and os.readlink(link) == str(lib):
            continue
        tmp = out / f".{link.name}.{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(lib)
        os.replace(tmp, link)  # atomic: a concurrent build never sees a missing or half-made link
    return out


def child_env(f: Flavour) -> dict:
    """Environment of the process that imports TensorRT and parses: the links first on LD_LIBRARY_PATH,
    and this package importable however the parent found it."""
    env = dict(os.environ)
    links = unversioned_links(f)
    if links is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(links), env.get("LD_LIBRARY_PATH", "")) if p)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    return env
