"""`tda-export setup`: install the Debian packages the native runtime (cpp/) needs and build it, so that the
first `run` takes the fast path instead of building for a minute or falling back to a slower backend."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import click


def _install(packages: list[str], log: Path) -> None:
    """apt-get update + install, each command shown as it runs, their output in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    from .native import deps

    with log.open("w") as out:
        for cmd in deps.install_commands(packages):
            click.echo(f"+ {shlex.join(cmd)}", err=True)
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            stdin = None if cmd[0] == "sudo" else subprocess.DEVNULL  # sudo may ask for a password
            proc = subprocess.run(cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if proc.returncode != 0:
                raise click.ClickException(f"`{shlex.join(cmd)}` failed with status {proc.returncode}; "
                                           f"its output: {log}")


@click.command()
@click.option("--no-install", is_flag=True, help="Install no Debian packages: only say what is missing, and build.")
def setup(no_install):
    """Install what the native C++ runtime needs and build it (once per machine and source version).

    \b
    On Debian: apt-get installs the missing ones of cmake make g++ nlohmann-json3-dev libpcre2-dev libssl-dev
    (with sudo when not root; each command is shown), then cpp/ and the CPU kernels of cuda/ are built
    into ~/.cache/tda-export. Elsewhere it names what to install and builds with what is there.
    """
    from .kernels.build import BuildError, build_cpu
    from .native import NativeBuildError, build_native, deps
    from .text import cache_dir

    missing = deps.missing_packages()
    if not deps.is_debian():
        click.echo(f"tda-export setup: {deps.not_debian_hint()}", err=True)
    elif missing and no_install:
        click.echo(f"tda-export setup: missing {' '.join(missing)}: {deps.install_hint(missing)}", err=True)
    elif missing and not deps.can_install():
        raise click.ClickException(f"missing {' '.join(missing)} and neither root nor sudo here: as root, run "
                                   f"`apt-get update && apt-get install {' '.join(missing)}`, then `tda-export setup`")
    elif missing:
        _install(missing, cache_dir() / "setup-apt.log")
    said = []

    def announce(_message: str) -> None:  # one progress line for both builds
        if not said:
            click.echo("building the native runtime and the CPU kernels (once, ~1-2 min)...", err=True)
            said.append(True)

    try:
        native = build_native(announce=announce)
        cpu = build_cpu(announce=announce)
    except NativeBuildError as e:
        raise click.ClickException(str(e)) from None
    except BuildError as e:
        raise click.ClickException(f"the CPU kernels failed to build: {str(e).splitlines()[-1]}") from None
    click.echo(f"native runtime built in {native.directory} (tda-run, libtda_runtime.so); CPU kernels: {cpu}")
