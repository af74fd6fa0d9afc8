"""Compile the kernel libraries on demand into a per-source-hash cache.

Libraries land in ``$TDA_KERNELS_CACHE`` (default ``~/.cache/tda-export/kernels``)
under ``<hash of sources and flags>/``, so editing a kernel rebuilds it and
switching branches back reuses the old build.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC_ROOT = Path(os.environ.get("TDA_KERNELS_SRC", Path(__file__).resolve().parents[2] / "cuda"))
CUDA_ARCHS = ("80", "89", "90")


def cuda_archs() -> tuple[str, ...]:
    """Architectures the CUDA library is built for: $TDA_CUDA_ARCHS (e.g. "90", comma-separated) or all of
    CUDA_ARCHS. A GPU session sets it to its own chip so the build costs one pass instead of three."""
    env = os.environ.get("TDA_CUDA_ARCHS", "").replace(" ", "")
    if not env:
        return CUDA_ARCHS
    archs = tuple(a.removeprefix("sm_") for a in env.split(",") if a)
    bad = [a for a in archs if not a.isdigit()]
    if bad:
        raise BuildError(f"TDA_CUDA_ARCHS={env!r}: {bad} are not compute capabilities like 90 or 89")
    return archs

# No -march=native (the cache may be shared across machines) and no
# -ffast-math (NaN poisoning in tests must propagate, and expf/erff must
# keep their accuracy); `omp simd` gives the vectorised reductions instead.
CPU_FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror"]
CUDA_FLAGS = ["-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo"]


class BuildError(RuntimeError):
    pass


def _sources(sub: str, suffix: str) -> list[Path]:
    return sorted((SRC_ROOT / "src" / sub).glob(f"*{suffix}"))


def _headers() -> list[Path]:
    return sorted((SRC_ROOT / "include").glob("*.h")) + sorted((SRC_ROOT / "src").rglob("*.h")) + \
        sorted((SRC_ROOT / "src").rglob("*.cuh"))


def _cache_dir(files: list[Path], flags: list[str]) -> Path:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(SRC_ROOT)).encode())
        h.update(f.read_bytes())
    h.update(" ".join(flags).encode())
    root = Path(os.environ.get("TDA_KERNELS_CACHE", Path.home() / ".cache" / "tda-export" / "kernels"))
    return root / h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _compile(cmd_prefix: list[str], sources: list[Path], flags: list[str], out_name: str,
             parallel: bool = False, announce: Callable[[], None] | None = None) -> Path:
    """parallel: one compiler process per source (then a link): nvcc and g++ compile the sources of one
    command one after another, so a 16-core GPU machine builds in the time of the largest file.
    announce: called before compiling (not when the cache has the library)."""
    includes = [f"-I{SRC_ROOT / 'include'}", f"-I{SRC_ROOT / 'src'}"]
    out_dir = _cache_dir(sources + _headers(), cmd_prefix + flags)
    lib = out_dir / out_name
    if lib.exists():
        return lib
    if announce is not None:
        announce()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent builders (pytest-xdist,
    # several processes) never see a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        if not parallel or len(sources) < 2:
            _run(cmd_prefix + flags + includes + [str(s) for s in sources] + ["-o", tmp])
        else:
            with tempfile.TemporaryDirectory(dir=out_dir) as obj_dir:
                objs = [str(Path(obj_dir) / f"{i}_{s.stem}.o") for i, s in enumerate(sources)]
                compile_flags = [f for f in flags if f != "-shared"]
                cmds = [cmd_prefix + compile_flags + includes + ["-c", str(s), "-o", o] for s, o in zip(sources, objs)]
                with ThreadPoolExecutor(max_workers=min(len(cmds), os.cpu_count() or 1)) as pool:
                    list(pool.map(_run, cmds))  # re-raises the first BuildError
                _run(cmd_prefix + flags + objs + ["-o", tmp])
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, lib)
    return lib


def build_cpu(announce: Callable[[str], None] | None = None) -> Path:
    """Path of libtda_kernels_cpu.so, compiled with g++ if not cached (announce is told when it compiles)."""
    cxx = os.environ.get("CXX", "g++")
    said = None if announce is None else (lambda: announce("building the CPU kernels (once)..."))
    return _compile([cxx], _sources("cpu", ".cpp"), CPU_FLAGS, "libtda_kernels_cpu.so", parallel=True, announce=said)


# The CUDA compiler of PyPI (the `test` extra installs it): nvidia-cuda-nvcc with nvidia-cuda-crt (crt/ headers),
# nvidia-cuda-runtime (cuda_runtime.h, libcudart_static.a), nvidia-nvvm (cicc) and nvidia-cuda-cccl (CUB), all
# under nvidia/cu13/.
NVCC_PACKAGES = ("nvidia-cuda-nvcc==13.0.* nvidia-cuda-runtime==13.0.* nvidia-cuda-crt==13.0.* nvidia-nvvm==13.0.* "
                 "nvidia-cuda-cccl==13.0.*")
NVCC_MISSING = ("nvcc not found (PATH, /usr/local/cuda/bin, or PyPI's nvidia-cuda-nvcc: "
                f"pip install {NVCC_PACKAGES}; pip install -e '.[test]' does)")


def _pip_nvcc() -> str | None:
    """bin/nvcc of PyPI's nvidia-cuda-nvcc in this interpreter's environment (the nvidia namespace package)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for nvcc in sorted(Path(root).glob("cu*/bin/nvcc"), reverse=True):
            if os.access(nvcc, os.X_OK):
                return str(nvcc)
    return None


TOOLKIT_NVCC = Path("/usr/local/cuda/bin/nvcc")


def nvcc_path() -> str | None:
    """nvcc on PATH, else a CUDA toolkit's in /usr/local/cuda, else PyPI's (the `test` extra)."""
    return shutil.which("nvcc") or (str(TOOLKIT_NVCC) if TOOLKIT_NVCC.exists() else None) or _pip_nvcc()


def cuda_include_dir() -> Path | None:
    """The directory with cuda_fp16.h that nvcc itself uses (its --dryrun INCLUDES: a toolkit, a wrapper script
    or PyPI's layout alike), for host-compiled tests of device headers; None without nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    for inc in re.findall(r'-I"?([^"\s]+)', proc.stdout + proc.stderr):
        if (Path(inc) / "cuda_fp16.h").exists():
            return Path(inc).resolve()
    return None


def _cuda_link_flags(nvcc: str) -> list[str]:
    """The pip layout keeps its libraries in <top>/lib, where nvcc.profile does not look (it names
    targets/<arch>/lib64 of a toolkit install): point the linker there for libcudart_static and libcudadevrt."""
    top = Path(nvcc).resolve().parent.parent
    if (top / "lib" / "libcudart_static.a").exists() and not (top / "lib64").exists():
        return [f"-L{top / 'lib'}"]
    return []


def _gencode(archs=CUDA_ARCHS) -> list[str]:
    # SASS for each target plus PTX for the newest, so later GPUs can JIT.
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def build_cuda() -> Path:
    """Path of libtda_kernels_cuda.so, compiled with nvcc if not cached."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError(NVCC_MISSING)
    return _compile([nvcc], _sources("cuda", ".cu"),
                    CUDA_FLAGS + _gencode(cuda_archs()) + ["--cudart=static"] + _cuda_link_flags(nvcc),
                    "libtda_kernels_cuda.so", parallel=True)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_check_cuda(archs=None, sources: list[Path] | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """Compile every .cu file of the kernel library (or ``sources``, e.g. the TensorRT plugins' device
    code, against the same includes) for each arch with ``-Xptxas -v``; raise on any
    compile error or register spill, naming the kernel.

    Returns {arch: {kernel: (spill_store_bytes, spill_load_bytes)}} (all zero).
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError(NVCC_MISSING)
    archs = cuda_archs() if archs is None else archs
    includes = [f"-I{SRC_ROOT / 'include'}", f"-I{SRC_ROOT / 'src'}"]
    report: dict[str, dict[str, tuple[int, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for src in _sources("cuda", ".cu") if sources is None else sources:
                cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-c", "-Xptxas", "-v",
                       f"-gencode=arch=compute_{arch},code=sm_{arch}", *includes, str(src),
                       "-o", str(Path(tmp) / f"{src.stem}_{arch}.o")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                log = proc.stdout + proc.stderr
                if proc.returncode != 0:
                    raise BuildError(f"nvcc failed for {src.name} sm_{arch}:\n{log}")
                kernel = None
                spills = report.setdefault(f"sm_{arch}", {})
                for line in log.splitlines():
                    if m := _ENTRY.search(line):
                        kernel = m.group(1)
                    elif (m := _SPILL.search(line)) and kernel is not None:
                        spills[kernel] = (int(m.group(1)), int(m.group(2)))
                        kernel = None
    bad = [(arch, k, v) for arch, ks in report.items() for k, v in ks.items() if v != (0, 0)]
    if bad:
        names = _demangle([k for _, k, _ in bad])
        raise BuildError("register spills:\n" + "\n".join(
            f"  {arch} {names[k]}: {st} bytes spill stores, {ld} bytes spill loads" for arch, k, (st, ld) in bad))
    if not any(report.values()):
        raise BuildError("ptxas reported no kernels; is -Xptxas -v output parsed correctly?")
    return report
