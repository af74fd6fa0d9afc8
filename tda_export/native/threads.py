"""The environment of the one thread pool (cpp/include/tda/runtime.h, "Threads").

libgomp and OpenBLAS read it once, when they load, so it must be set before the first of them loads:
for the CLI that is torch (cli.py calls gomp_spin_default() before anything imports torch), and the
native library then shares torch's libgomp. Standard library only, so importing it loads neither.
"""
from __future__ import annotations

import os
import re

from .build import CPP


def _header_define(name: str) -> str:
    header = (CPP / "include" / "tda" / "runtime.h").read_text()
    return re.search(rf"#define {name} \"?(\d+)\"?", header).group(1)


def gomp_spin_default() -> None:
    """GOMP_SPINCOUNT: a ~5 µs spin before an idle worker sleeps, or none when the load average says the
    machine is oversubscribed (any spin loses there: bench/RESULTS.md). A value of the user's stands."""
    spin = _header_define("TDA_RT_GOMP_SPINCOUNT")
    if os.getloadavg()[0] > float(_header_define("TDA_RT_BUSY_LOAD_PER_CORE")) * (os.cpu_count() or 1):
        spin = "0"
    os.environ.setdefault("GOMP_SPINCOUNT", spin)


def pool_environment() -> None:
    """Before the native library loads: the spin above, and OpenBLAS single-threaded inside the pool."""
    gomp_spin_default()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
