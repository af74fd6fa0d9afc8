"""What the native runtime (cpp/) needs from the system, in Debian's package names, and the command that
installs it: read by build.py to name the missing package when a build fails, and by `tda-export setup`
to install them. Standard library only."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Dependency:
    package: str     # Debian's name
    provides: str    # what the build lacks without it, as a user would recognise it
    symptoms: tuple[str, ...]  # regular expressions that find its absence in a CMake/compiler log


# In the order CMake asks for them (cpp/CMakeLists.txt, cpp/tokenizer/CMakeLists.txt).
DEPENDENCIES = (
    Dependency("cmake", "cmake", ()),
    Dependency("make", "make (CMake's build tool)",
               (r"unable to find a build program", r"CMAKE_MAKE_PROGRAM is not set")),
    Dependency("g++", "a C++17 compiler with OpenMP",
               (r"No CMAKE_CXX_COMPILER could be found", r"Could NOT find OpenMP", r"g\+\+: not found")),
    Dependency("libssl-dev", "OpenSSL's libcrypto (openssl/sha.h)",
               (r"Could NOT find OpenSSL", r"openssl/\w+\.h: No such file")),
    Dependency("nlohmann-json3-dev", "nlohmann/json.hpp",
               (r'provided by "nlohmann_json"', r"nlohmann_json(Config|-config)\.cmake",
                r"nlohmann/json\.hpp: No such file")),
    Dependency("libpcre2-dev", "PCRE2 (pcre2.h, libpcre2-8)", (r"needs PCRE2", r"pcre2\.h: No such file",
                                                                 r"pcre2_\w+. (does not name a type|was not declared)")),
)
PACKAGES = tuple(d.package for d in DEPENDENCIES)


def is_debian() -> bool:
    return shutil.which("dpkg-query") is not None and shutil.which("apt-get") is not None


def missing_packages(packages=PACKAGES) -> list[str]:
    """The packages dpkg does not list as installed ([] off Debian, where nothing can be asked)."""
    if shutil.which("dpkg-query") is None:
        return []
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages],
                         capture_output=True, text=True).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def named_by_log(log: str) -> list[str]:
    """The packages whose absence the build log shows, in DEPENDENCIES' order."""
    return [d.package for d in DEPENDENCIES if any(re.search(s, log) for s in d.symptoms)]


def can_install() -> bool:
    """apt-get can be run from here: as root, or through sudo."""
    return is_debian() and (os.geteuid() == 0 or shutil.which("sudo") is not None)


def install_commands(packages) -> list[list[str]]:
    """apt-get update (a fresh machine has no package lists), then apt-get install of exactly `packages`;
    prefixed with sudo where not root."""
    apt = ([] if os.geteuid() == 0 else ["sudo"]) + ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]
    return [[*apt, "update"], [*apt, "install", "-y", "--no-install-recommends", *packages]]


def install_hint(packages) -> str:
    """The command a user runs to install `packages`, as one shell line (with the update a fresh machine needs)."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get update && {sudo}apt-get install {' '.join(packages)}"


def not_debian_hint() -> str:
    return ("not a Debian system (no dpkg/apt-get): install " + ", ".join(d.provides for d in DEPENDENCIES) +
            " with your package manager (Debian names: " + " ".join(PACKAGES) + ")")
