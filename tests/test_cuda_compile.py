"""The CUDA kernels compile for sm_80/89/90 without register spills, and the
library links and loads (no GPU needed for either).

About 1 minute for the check and 40 s for the library on a 2-core box."""
import pytest

from tda_export.kernels import build

pytestmark = pytest.mark.skipif(build.nvcc_path() is None, reason="nvcc not installed")


def test_compile_check_no_spills():
    report = build.compile_check_cuda()
    assert set(report) == {f"sm_{a}" for a in build.CUDA_ARCHS}
    for arch, kernels in report.items():
        assert any("gate_up_mma" in k for k in kernels), arch
        assert any("down_proj" in k for k in kernels), arch


def test_cuda_library_builds_and_loads():
    from tda_export.kernels.abi import Library

    lib = Library(build.build_cuda())
    assert lib.backend == "cuda" and lib.abi_version == 1
    assert lib.status_string(0) == "ok"
