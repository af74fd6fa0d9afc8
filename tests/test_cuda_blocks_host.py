"""The CUDA kernels' reading of the block formats runs on the CPU: cuda/src/cuda/blocks.cuh is plain C++ once
its CUDA built-ins are shimmed (blocks_host_shim.h), so tests/cuda_blocks_host_main.cpp runs the very functions
the quantized decode (gate_up_q, down_proj<BlockRows>) and tda_block_linear / tda_block_dequantize use, lane by
lane, under ASan/UBSan. Dequantization must equal ops/blocks.py bit for bit on arbitrary bytes (every scale bit
pattern but NaN/inf, every nibble); the dot products must meet the fp64 reference of the dequantized weights.
What this cannot show (the launch grids, shuffles, the union and the split-K) is covered by the GPU tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tda_export.kernels import build
from tda_export.ops import blocks, contract

FORMATS = tuple(contract.BLOCK_FORMATS)
CODE = {name: contract.WEIGHT_FORMATS.index(name) for name in FORMATS}


CUDA_INCLUDE = build.cuda_include_dir()
pytestmark = [pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed"),
              pytest.mark.skipif(CUDA_INCLUDE is None, reason="no CUDA headers (nvcc not installed)")]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    src = build.SRC_ROOT
    exe = tmp_path_factory.mktemp("cuda_blocks_host") / "cuda_blocks_host"
    subprocess.run(["g++", "-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", f"-I{src / 'include'}",
                    f"-I{src / 'src'}", f"-I{CUDA_INCLUDE}", str(Path(__file__).with_name("cuda_blocks_host_main.cpp")),
                    "-o", str(exe)], check=True, capture_output=True)
    return exe


def _arbitrary_blocks(name: str, rows: int, k: int, rng) -> np.ndarray:
    """Random bytes with finite fp16 scales: zero, -0, subnormal, tiny and fp16-max scales among them."""
    bb = blocks.block_format(name).block_bytes
    raw = rng.integers(0, 256, size=(rows, k // 32, bb), dtype=np.uint8)
    n_scales = 2 if name == "q4_1" else 1
    scales = rng.standard_normal((rows, k // 32, n_scales)).astype(np.float16)
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0], np.float16)
    flat = scales.reshape(-1)
    flat[: min(len(flat), len(special))] = special[: len(flat)]
    raw[..., : 2 * n_scales] = scales.view(np.uint8).reshape(rows, k // 32, 2 * n_scales)
    return raw.reshape(rows, -1)


def _run(harness, name, k, rows, nb, w, x):
    out = subprocess.run([str(harness), str(CODE[name]), str(k), str(rows), str(nb)],
                         input=w.tobytes() + x.astype(np.float32).tobytes(), capture_output=True, check=True).stdout
    f = np.frombuffer(out, np.float32)
    deq, d1, d2 = np.split(f, [rows * k, rows * k + rows * nb])
    return deq.reshape(rows, k), d1.reshape(rows, nb), d2.reshape(rows, nb)


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_bit_for_bit(harness, name):
    rng = np.random.default_rng(CODE[name])
    for k, rows in ((32, 1), (96, 7), (1056, 5)):  # 1056: 33 blocks, more than a warp step's 8 x kQSteps 4
        w = _arbitrary_blocks(name, rows, k, rng)
        deq, _, _ = _run(harness, name, k, rows, 1, w, np.zeros(k, np.float32))
        ref = blocks.dequantize(name, w)
        np.testing.assert_array_equal(deq.view(np.uint32) & 0x7fffffff, ref.view(np.uint32) & 0x7fffffff)
        np.testing.assert_array_equal(deq, ref)  # values (so -0 == 0): the sign of a zero weight is no weight


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("nb", [1, 3, 4, 8])
def test_block_dots_meet_fp64(harness, name, nb):
    """block_dots for R = 1 (tda_block_linear) and R = 2 (gate_up's gate and up rows), tiles of 1/4/8 sequences
    with fewer valid: every dot product within fp32 accumulation noise of the fp64 one on the same weights."""
    rng = np.random.default_rng(10 * nb + CODE[name])
    for k, rows in ((32, 2), (160, 6), (4096, 4)):
        w = blocks.quantize(name, rng.standard_normal((rows, k)).astype(np.float32))
        x = rng.standard_normal((nb, k)).astype(np.float32)
        _, d1, d2 = _run(harness, name, k, rows, nb, w, x)
        ref = blocks.dequantize(name, w).astype(np.float64) @ x.astype(np.float64).T
        scale = np.abs(blocks.dequantize(name, w)).astype(np.float64) @ np.abs(x).astype(np.float64).T
        for got in (d1, d2):
            assert np.all(np.abs(got - ref) <= 1e-6 * scale + 1e-30), (name, nb, k, np.max(np.abs(got - ref) / scale))
