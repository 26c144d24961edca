"""Only fedlora's own ClientApp runs next to an agent's data.

A Flower SuperNode runs whatever ClientApp the coordinator's app bundle (FAB) names,
installing the bundle's files and dependencies beside it. A ``fedlora client`` agent instead
puts this module first on its SuperNode's PATH as ``flwr-clientapp``: it accepts a bundle
only if it carries nothing but a ``pyproject.toml`` whose ClientApp is the installed
``fedlora.client.app:app`` and whose dependencies, if it lists any, this machine already
satisfies (what ``fedlora coordinator`` submits, and what ``flwr run .`` builds from a
checkout: its ``fab-include`` keeps the code out). Nothing is ever installed: the launcher
turns Flower's runtime dependency installation off, so the code that runs is the fedlora
and the libraries this machine installed. Any other bundle is refused before it is unpacked.

An agent that runs a resident trainer (``fedlora.deploy.trainer``) writes its launcher
with ``relay=True``: once the bundle has passed the check, the ClientApp that runs is
``fedlora.client.relay``, which hands the message to that trainer, in place of importing
``fedlora.client.handler`` (and torch) in every per-message process. Either way the code is
the installed fedlora's, and only for a bundle that names ``fedlora.client.app:app``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

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
    missing = unmet_dependencies(project.get("project", {}).get("dependencies") or [])
    if missing:
        raise UntrustedBundle(
            f"it asks for dependencies this machine lacks ({', '.join(missing[:3])}); an agent installs nothing"
        )


def unmet_dependencies(requirements: object) -> list[str]:
    """The requirements of a bundle's ``[project].dependencies`` that the installed
    distributions do not meet (a malformed one counts as unmet)."""
    if not isinstance(requirements, list):
        return [str(requirements)[:80]]
    unmet = []
    for text in requirements:
        try:
            req = Requirement(str(text))
            if req.marker is not None and not req.marker.evaluate():
                continue  # not for this platform
            installed = metadata.version(req.name)
        except (InvalidRequirement, metadata.PackageNotFoundError):
            unmet.append(str(text)[:80])
            continue
        if req.url or not req.specifier.contains(installed, prereleases=True):
            unmet.append(str(text)[:80])
    return unmet


def write_launcher(folder: Path, relay: bool = False) -> Path:
    """The ``flwr-clientapp`` an agent's SuperNode finds first on its PATH; returns the folder.
    ``relay``: run ``fedlora.client.relay`` (the agent runs a resident trainer)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    launcher = folder / "flwr-clientapp"
    launcher.write_text(f"#!{sys.executable}\nfrom fedlora.deploy.trusted_app import main\nmain(relay={relay!r})\n")
    launcher.chmod(0o700)
    return folder


def main(relay: bool = False) -> None:
    """Flower's ``flwr-clientapp``, with the bundle checked before it is installed."""
    from flwr.supernode.runtime import (
        run_clientapp as runtime,  # lazy: the agent imports this module for write_launcher alone
    )

    install = runtime.install_from_fab
    checked: list[bool] = []

    def install_checked(fab, *args, **kwargs):
        try:
            check_bundle(fab if isinstance(fab, bytes) else Path(fab).read_bytes())
        except UntrustedBundle as exc:
            print(f"fedlora client: refused the coordinator's app bundle: {exc}", file=sys.stderr, flush=True)
            raise
        checked.append(True)
        return install(fab, *args, **kwargs)

    runtime.install_from_fab = install_checked
    if relay:
        runtime.get_load_client_app_fn = lambda *args, **kwargs: _relay_loader(checked)
    _flwr_clientapp(runtime.run_clientapp)


def _flwr_clientapp(run_clientapp) -> None:
    """Flower 1.39's ``flwr_clientapp`` command, line for line, minus its package (importing
    ``flwr.supernode.cli`` also imports the whole SuperNode, 0.4 s of every message) and
    with runtime dependency installation always off."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token  # lazy: as in main
    from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS  # lazy: as in main
    from flwr.supercore.tls import validate_and_resolve_root_certificates  # lazy: as in main

    parser = argparse.ArgumentParser(description="Run a Flower ClientApp")
    parser.add_argument(
        "--runtime-api-address",
        dest="runtime_api_address",
        default=SUPERNODE_DEFAULT_CLIENT_ADDRESS,
        type=str,
        help="Address of SuperNode's Runtime API (IPv4, IPv6, or a domain name).",
    )
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args()
    run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,  # whatever the SuperNode says: an agent installs nothing
    )


def _relay_loader(checked: list[bool]):
    """Flower's ClientApp loader, answering with the relay, and only after a bundle passed."""

    def load(fab_id: str, fab_version: str, fab_hash: str):
        if not checked:
            raise UntrustedBundle("no app bundle was checked before the ClientApp was loaded")
        from fedlora.client.relay import app  # lazy: the agent imports this module for write_launcher alone

        return app

    return load
