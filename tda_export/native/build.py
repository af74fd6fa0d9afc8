"""Build cpp/ (libtda_runtime, tda-run) with CMake on demand into a per-source-hash cache.

As tda_export/kernels/build.py does for cuda/: the build lands in ``$TDA_NATIVE_CACHE`` (default
``~/.cache/tda-export/native``) under ``<hash of sources and options>/``, so editing the C++ rebuilds
it and switching branches back reuses the old build. The directory is built beside its final name
and renamed into place, so concurrent builders never see half a build.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import deps

ROOT = Path(__file__).resolve().parents[2]
CPP = Path(os.environ.get("TDA_NATIVE_SRC", ROOT / "cpp"))
KERNELS = Path(os.environ.get("TDA_KERNELS_SRC", ROOT / "cuda"))
SUFFIXES = (".cpp", ".h", ".hpp", ".txt", ".cmake")


class NativeBuildError(RuntimeError):
    """One line: what is missing and the command that installs it, or the first compiler error; the full
    log is in the file the line names (log)."""

    def __init__(self, message: str, log: Path | None = None, packages: tuple[str, ...] = ()):
        super().__init__(message)
        self.log = log
        self.packages = packages


PROGRESS = "building the native runtime (once, ~1 min)..."


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class NativeBuild:
    directory: Path

    @property
    def library(self) -> Path:
        return self.directory / "libtda_runtime.so"

    @property
    def cli(self) -> Path:
        return self.directory / "tda-run"

    @property
    def tests(self) -> Path:
        return self.directory / "tda_runtime_tests"

    @property
    def parallel_tests(self) -> Path:
        return self.directory / "tda_parallel_tests"


def blas_dir() -> Path:
    try:
        import scipy_openblas32
    except ImportError:
        raise NativeBuildError("the native backend needs the BLAS of PyPI scipy-openblas32: "
                               "pip install scipy-openblas32") from None
    return Path(scipy_openblas32.__file__).parent


def _sources() -> list[Path]:
    files = [p for p in sorted(CPP.rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    files += [p for p in sorted((KERNELS / "src" / "cpu").glob("*")) if p.suffix in SUFFIXES]
    files += sorted((KERNELS / "src").glob("*.h")) + sorted((KERNELS / "include").glob("*.h"))
    return files


def _cache_dir(options: list[str]) -> Path:
    h = hashlib.sha256()
    for f in _sources():
        h.update(str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f).encode())
        h.update(f.read_bytes())
    h.update(" ".join(options).encode())
    root = Path(os.environ.get("TDA_NATIVE_CACHE", Path.home() / ".cache" / "tda-export" / "native"))
    return root / h.hexdigest()[:16]


def _missing_error(packages: list[str], log: Path | None) -> NativeBuildError:
    """The one line for a build that lacks system packages (and any other the runtime needs that dpkg
    says are missing too, so one install fixes the machine)."""
    packages = [p for p in deps.PACKAGES if p in set(packages) | set(deps.missing_packages())]
    what = "; ".join(d.provides for d in deps.DEPENDENCIES if d.package in packages)
    where = f" (log: {log})" if log else ""
    if deps.is_debian():
        fix = f"run `tda-export setup` or `{deps.install_hint(packages)}`"
    else:
        fix = f"install it with your package manager (Debian: {' '.join(packages)})"
    return NativeBuildError(f"the native runtime cannot be built: {what} not found; {fix}{where}", log,
                            tuple(packages))


def _failure(cmd: list[str], proc: subprocess.CompletedProcess, log: Path) -> NativeBuildError:
    text = f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    log.write_text(text)
    if packages := deps.named_by_log(text):
        return _missing_error(packages, log)
    first = next((line.strip() for line in text.splitlines() if re.search(r"\berror\b", line, re.I)),
                 f"{Path(cmd[0]).name} exited with status {proc.returncode}")
    return NativeBuildError(f"the native runtime failed to build: {first[:300]} (full log: {log})", log)


def build_native(sanitize: bool = False, tensorrt_include: str | Path | None = None,
                 announce: Callable[[str], None] | None = _to_stderr) -> NativeBuild:
    """The built runtime (cached); raises NativeBuildError (one line, the log in a file) on failure.
    tensorrt_include: TensorRT's include directory, to build the TensorRT executor too (docs/native.md).
    announce: told PROGRESS when a build starts (not when the cache has it); stderr by default."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise _missing_error(["cmake"], None)
    options = [f"-DTDA_BLAS_DIR={blas_dir()}", f"-DTDA_KERNELS_DIR={KERNELS}",
               f"-DTDA_SANITIZE={'ON' if sanitize else 'OFF'}", "-DCMAKE_BUILD_TYPE=" + ("Debug" if sanitize else "Release")]
    if sanitize:  # the sanitizer build checks the runtime; tda-run takes --prompt-ids there
        options.append("-DTDA_WITH_TOKENIZER=OFF")
    if tensorrt_include is not None:
        options.append(f"-DTDA_TENSORRT_INCLUDE={Path(tensorrt_include).resolve()}")
    out = _cache_dir(options)
    done = NativeBuild(out)
    if done.library.exists() and done.cli.exists():
        return done
    if announce is not None:
        announce(PROGRESS)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        for cmd in ([cmake, "-S", str(CPP), "-B", str(work / "build"), *options],
                    [cmake, "--build", str(work / "build"), "-j", str(min(4, os.cpu_count() or 1))]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise _failure(cmd, proc, out.parent / f"{out.name}.failed.log")
        stage = work / "out"
        stage.mkdir()
        for name in ("tda-run", "tda_runtime_tests", "tda_parallel_tests"):
            shutil.copy2(work / "build" / name, stage / name)
        for lib in (work / "build").rglob("lib*.so*"):  # the runtime, and the tokenizer if built shared
            shutil.copy2(lib, stage / lib.name)
        try:
            os.rename(stage, out)
        except OSError:  # another process finished first: use its build
            if not done.library.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done
