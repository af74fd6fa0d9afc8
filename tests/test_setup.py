"""`tda-export setup` and the native build's failures: what is missing is named in one line with the command that
installs it (the CMake/compiler log goes to a file), apt-get is run exactly as shown (sudo where not root), and
nvcc is found in PyPI's nvidia-cuda-nvcc layout when no toolkit is installed."""
import os
import stat
import subprocess

import pytest
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.kernels import build as kbuild
from tda_export.native import build as nbuild
from tda_export.native import deps
from tda_export.native.build import NativeBuild, NativeBuildError, build_native

LOGS = [  # (package, excerpt of the real log of a build without it)
    ("nlohmann-json3-dev", 'Could not find a package configuration file provided by "nlohmann_json"\n'
                           '  (requested version 3.10) with any of the following names:'),
    ("libpcre2-dev", "CMake Error at tokenizer/CMakeLists.txt:17 (message):\n  tda_tokenizer needs PCRE2 (pcre2.h and "
                     "libpcre2-8): apt-get install libpcre2-dev"),
    ("libpcre2-dev", "regex.cpp:15:3: error: \u2018pcre2_code\u2019 does not name a type"),  # a pcre2.h without it
    ("libssl-dev", "Could NOT find OpenSSL, try to set the path to OpenSSL root folder in the system variable"),
    ("g++", "CMake Error at CMakeLists.txt:2 (project):\n  No CMAKE_CXX_COMPILER could be found."),
    ("make", 'CMake Error: CMake was unable to find a build program corresponding to "Unix Makefiles".  '
             "CMAKE_MAKE_PROGRAM is not set."),  # Debian's cmake only recommends make
]


@pytest.mark.parametrize("package,log", LOGS)
def test_each_missing_package_is_named_from_its_log(package, log):
    assert deps.named_by_log(log) == [package]
    assert deps.named_by_log("error: expected ';' before '}' token") == []


def fake_cpp(tmp_path, monkeypatch, body: str) -> None:
    """cpp/ replaced by a one-line CMake project (body), built into a cache under tmp_path."""
    src = tmp_path / "cpp"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION 3.16)\nproject(t NONE)\n{body}\n")
    monkeypatch.setattr(nbuild, "CPP", src)
    monkeypatch.setenv("TDA_NATIVE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def failing_source(tmp_path, monkeypatch):
    """A project that cannot find nlohmann_json, as on a machine without nlohmann-json3-dev."""
    fake_cpp(tmp_path, monkeypatch, "find_package(nlohmann_json 3.10 REQUIRED PATHS /nonexistent NO_DEFAULT_PATH)")


@pytest.mark.skipif(not deps.is_debian(), reason="the install command named is Debian's")
def test_build_failure_is_one_line_naming_the_package_and_the_log(failing_source, capsys):
    with pytest.raises(NativeBuildError) as err:
        build_native()
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert "nlohmann/json.hpp not found" in message and "apt-get install nlohmann-json3-dev" in message, message
    assert "tda-export setup" in message and f"(log: {err.value.log})" in message, message
    assert 'provided by "nlohmann_json"' in err.value.log.read_text()  # the full CMake output, in the file
    assert capsys.readouterr().err.strip() == nbuild.PROGRESS  # the one progress line of a first build


def test_other_build_errors_name_the_first_error_line(tmp_path, monkeypatch):
    fake_cpp(tmp_path, monkeypatch, 'message(FATAL_ERROR "something else broke")')
    with pytest.raises(NativeBuildError) as err:
        build_native(announce=None)
    assert len(str(err.value).splitlines()) == 1 and "failed to build: CMake Error" in str(err.value), str(err.value)
    assert "something else broke" in err.value.log.read_text()


def test_missing_cmake_is_named(monkeypatch):
    which = nbuild.shutil.which
    monkeypatch.setattr(nbuild.shutil, "which", lambda name: None if name == "cmake" else which(name))
    monkeypatch.setattr(deps, "is_debian", lambda: True)
    monkeypatch.setattr(deps, "missing_packages", lambda packages=deps.PACKAGES: ["cmake", "libpcre2-dev"])
    with pytest.raises(NativeBuildError, match=r"cmake; PCRE2 .* not found; .*apt-get install cmake libpcre2-dev`$"):
        build_native()
    monkeypatch.setattr(deps, "is_debian", lambda: False)
    with pytest.raises(NativeBuildError, match=r"install it with your package manager \(Debian: cmake libpcre2-dev\)"):
        build_native()


def test_install_commands_use_sudo_only_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    update, install = deps.install_commands(["libpcre2-dev"])
    assert update[:1] == ["apt-get"] and update[-1] == "update"
    assert install[:1] == ["apt-get"] and install[-4:] == ["install", "-y", "--no-install-recommends", "libpcre2-dev"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert all(cmd[:2] == ["sudo", "apt-get"] for cmd in deps.install_commands(["libpcre2-dev"]))
    assert deps.install_hint(["cmake", "g++"]) == "sudo apt-get update && sudo apt-get install cmake g++"


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A Debian machine lacking two packages, with the builds stubbed: the commands setup runs are recorded."""
    ran = []
    monkeypatch.setattr(deps, "is_debian", lambda: True)
    monkeypatch.setattr(deps, "can_install", lambda: True)
    monkeypatch.setattr(deps, "missing_packages", lambda packages=deps.PACKAGES: ["nlohmann-json3-dev", "libpcre2-dev"])
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setenv("TDA_EXPORT_CACHE", str(tmp_path / "cache"))

    def native(announce=None, **kw):
        announce(nbuild.PROGRESS)
        return NativeBuild(tmp_path / "native")

    monkeypatch.setattr(nbuild, "build_native", native)
    monkeypatch.setattr("tda_export.native.build_native", native)
    monkeypatch.setattr(kbuild, "build_cpu", lambda announce=None: announce("cpu") or tmp_path / "libtda_kernels_cpu.so")
    return ran


def test_setup_installs_the_missing_packages_then_builds(fake_machine, tmp_path):
    r = CliRunner().invoke(main, ["setup"])
    assert r.exit_code == 0, r.output
    assert [cmd[-1] for cmd in fake_machine] == ["update", "libpcre2-dev"]
    assert fake_machine[1][-3:] == ["--no-install-recommends", "nlohmann-json3-dev", "libpcre2-dev"]
    lines = r.output.splitlines()
    assert lines[0].startswith("+ ") and lines[0].endswith(" update") and "nlohmann-json3-dev libpcre2-dev" in lines[1]
    assert lines[2] == "building the native runtime and the CPU kernels (once, ~1-2 min)..."  # once, for both
    assert lines[3].startswith(f"native runtime built in {tmp_path / 'native'}") and len(lines) == 4, r.output


def test_setup_no_install_names_what_is_missing(fake_machine):
    r = CliRunner().invoke(main, ["setup", "--no-install"])
    assert r.exit_code == 0 and fake_machine == [], r.output
    assert "missing nlohmann-json3-dev libpcre2-dev: " in r.output and "apt-get install" in r.output


def test_setup_reports_a_build_failure_in_one_line(fake_machine, monkeypatch):
    def fails(announce=None, **kw):
        raise NativeBuildError("the native runtime cannot be built: PCRE2 (pcre2.h, libpcre2-8) not found; ...")

    monkeypatch.setattr("tda_export.native.build_native", fails)
    r = CliRunner().invoke(main, ["setup", "--no-install"])
    assert r.exit_code == 1 and "Error: the native runtime cannot be built: PCRE2" in r.output, r.output
    assert "Traceback" not in r.output


def test_nvcc_from_the_pypi_layout(tmp_path, monkeypatch):
    """nvidia-cuda-nvcc puts nvcc in site-packages/nvidia/cu13/bin and the CUDA runtime's libraries in
    nvidia/cu13/lib, where nvcc.profile does not look: found when nothing is on PATH, with the -L it needs."""
    top = tmp_path / "site" / "nvidia" / "cu13"
    (top / "bin").mkdir(parents=True)
    (top / "lib").mkdir()
    nvcc = top / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    (top / "lib" / "libcudart_static.a").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert kbuild._pip_nvcc() == str(nvcc)
    monkeypatch.setattr(kbuild.shutil, "which", lambda name: None)
    monkeypatch.setattr(kbuild, "TOOLKIT_NVCC", tmp_path / "absent" / "nvcc")
    assert kbuild.nvcc_path() == str(nvcc)
    assert kbuild._cuda_link_flags(str(nvcc)) == [f"-L{top / 'lib'}"]
    assert kbuild._cuda_link_flags("/usr/local/cuda/bin/nvcc") == []  # a toolkit install: nvcc.profile knows
