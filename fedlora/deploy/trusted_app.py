"""Only fedlora's own ClientApp runs next to an agent's data.

A Flower SuperNode runs whatever ClientApp the coordinator's app bundle (FAB) names,
installing the bundle's files beside it. A ``fedlora client`` agent instead puts this
module first on its SuperNode's PATH as ``flwr-clientapp``: it accepts a bundle only if
it carries nothing but a ``pyproject.toml`` whose ClientApp is the installed
``fedlora.client.app:app`` and that asks for no dependencies, so the code that runs is
the fedlora this machine installed. Any other bundle is refused before it is unpacked.
"""

from __future__ import annotations

import io
import sys
import tomllib
import zipfile
from pathlib import Path

TRUSTED_CLIENTAPP = "fedlora.client.app:app"
FLOWER_METADATA = ".info/"  # the bundle's file hashes, written by Flower's own builder


class UntrustedBundle(Exception):
    """An app bundle this agent will not run; the message says why, in one line."""


def check_bundle(fab: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            files = sorted(n for n in archive.namelist() if not n.startswith(FLOWER_METADATA))
            if files != ["pyproject.toml"]:
                extra = [n for n in files if n != "pyproject.toml"][:3]
                raise UntrustedBundle(
                    f"it carries code or files of its own ({', '.join(extra) or 'no pyproject.toml'})"
                )
            project = tomllib.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise UntrustedBundle("it is not a readable Flower app bundle") from None
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components.get("clientapp") != TRUSTED_CLIENTAPP:
        raise UntrustedBundle(f"its ClientApp is {str(components.get('clientapp'))[:80]!r}, not {TRUSTED_CLIENTAPP!r}")
    if project.get("project", {}).get("dependencies"):
        raise UntrustedBundle("it asks for dependencies to be installed")


def write_launcher(folder: Path) -> Path:
    """The ``flwr-clientapp`` an agent's SuperNode finds first on its PATH; returns the folder."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    launcher = folder / "flwr-clientapp"
    launcher.write_text(f"#!{sys.executable}\nfrom fedlora.deploy.trusted_app import main\nmain()\n")
    launcher.chmod(0o700)
    return folder


def main() -> None:
    """Flower's ``flwr-clientapp``, with the bundle checked before it is installed."""
    from flwr.supernode.cli import flwr_clientapp  # lazy: the agent imports this module for write_launcher alone
    from flwr.supernode.runtime import (
        run_clientapp as runtime,  # lazy: the agent imports this module for write_launcher alone
    )

    install = runtime.install_from_fab

    def install_checked(fab, *args, **kwargs):
        try:
            check_bundle(fab if isinstance(fab, bytes) else Path(fab).read_bytes())
        except UntrustedBundle as exc:
            print(f"fedlora client: refused the coordinator's app bundle: {exc}", file=sys.stderr, flush=True)
            raise
        return install(fab, *args, **kwargs)

    runtime.install_from_fab = install_checked
    flwr_clientapp()
