"""The native runtime's decode-step thread governor (cpp/src/parallel.h): its decisions on simulated step
times (the C++ test binary), and that running steps on fewer threads changes no token: tda-run's greedy
ids with the governor on, its probes forced onto one thread, equal the ids with it off and with one thread."""
import os
import subprocess

import pytest

from tda_export.native import build_native
from test_native import native  # noqa: F401  (the built runtime, a fixture)
from test_runtime import build_engine


@pytest.fixture(scope="module")
def engine(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("governor")
    return build_engine(tiny_dirs["llama"], root / "engine", root, family="llama")[0]


def test_governor_decisions_binary(native):
    """cpp/tests/parallel_tests.cpp, also under ASan + UBSan (the build test_native's sanitizer test makes)."""
    for build in (native, build_native(sanitize=True)):
        r = subprocess.run([str(build.parallel_tests)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def _ids(native, engine, density, threads, **env):
    r = subprocess.run([str(native.cli), "-e", str(engine), "--prompt-ids", "5,6,7,8,9", "-n", "100", "-d", density,
                        "--threads", str(threads), "--print-ids", "--no-verify"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TDA_NATIVE_SLICE_BYTES": "1",  # fork even the tiny calls
                                         "TDA_NATIVE_ADAPTIVE_THREADS_TRACE": "1", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.split(), r.stderr


@pytest.mark.parametrize("density", ["1.0", "0.5"])
def test_governed_steps_keep_greedy_tokens(native, engine, density):
    on, trace = _ids(native, engine, density, 2, TDA_NATIVE_ADAPTIVE_THREADS="1")
    off, off_trace = _ids(native, engine, density, 2, TDA_NATIVE_ADAPTIVE_THREADS="0")
    one, _ = _ids(native, engine, density, 1)
    assert len(on) > 40 and on == off == one
    # the governor ran: its probes (the first after 32 timed steps) put steps on one thread, the rest on two
    line = next(x for x in trace.splitlines() if x.startswith("tda: decode steps by threads:"))
    counts = {int(n): int(c) for c, n in (p.split(" on ") for p in line.split(": ", 2)[2].split(", "))}
    assert counts[1] >= 1 and counts[2] >= 2 and counts[1] + counts[2] in (len(on) - 1, len(on)), line
    assert "decode steps by threads" not in off_trace  # off: no governor


def test_governor_switch_errors(native, engine):
    r = subprocess.run([str(native.cli), "-e", str(engine), "--prompt-ids", "5,6", "-n", "2", "--threads", "2"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "TDA_NATIVE_ADAPTIVE_THREADS": "2"})
    assert r.returncode == 2 and "TDA_NATIVE_ADAPTIVE_THREADS=2: expected 0 or 1" in r.stderr, r.stderr
