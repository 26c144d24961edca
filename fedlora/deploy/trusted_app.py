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

The agent's SuperNode serves its runtime API (the ClientApp's link to it) on a Unix socket
in the agent's state folder (``fedlora.deploy.supernode --api-socket``), not on a loopback
TCP port every user of the machine could call. Its launchers then route Flower's HTTP client
through that socket (``fedlora.deploy.local_api``, as on the coordinator), and the agent's
``flower-superexec`` launcher hands each ClientApp its task token in a file readable by this
user alone (removed once read), never on a command line, and acquires ClientApp tasks only:
a run that asks for another kind of process (an AgentApp) gets none on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

TRUSTED_CLIENTAPP = "fedlora.client.app:app"
FLOWER_METADATA = ".info/"  # the bundle's file hashes, written by Flower's own builder
# Flower installs a bundle in $FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>: each of the
# three must be a plain name, or the folder (and the pyproject.toml written there) lands elsewhere
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]{0,99}")


class UntrustedBundle(Exception):
    """An app bundle this agent will not run; the message says why, in one line."""


def bundle_project(fab: bytes) -> dict:
    """The ``pyproject.toml`` of a bundle that carries nothing else, with safe names."""
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
    check_names(project)
    return project


def check_bundle(fab: bytes) -> None:
    project = bundle_project(fab)
    meta, app = _table(project, "project"), _table(project, "tool", "flwr", "app")
    components = _table(app, "components")
    if components.get("clientapp") != TRUSTED_CLIENTAPP:
        raise UntrustedBundle(f"its ClientApp is {str(components.get('clientapp'))[:80]!r}, not {TRUSTED_CLIENTAPP!r}")
    missing = unmet_dependencies(meta.get("dependencies") or [])
    if missing:
        raise UntrustedBundle(
            f"it asks for dependencies this machine lacks ({', '.join(missing[:3])}); an agent installs nothing"
        )


def check_names(project: dict) -> None:
    """The names Flower builds a bundle's install folder from (publisher, name, version, in its
    ``pyproject.toml``) are plain names: no path in them takes the folder out of FLWR_HOME."""
    meta, app = _table(project, "project"), _table(project, "tool", "flwr", "app")
    for field, value in (
        ("publisher", app.get("publisher")),
        ("name", meta.get("name")),
        ("version", meta.get("version")),
    ):
        if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
            raise UntrustedBundle(f"its {field} {repr(value)[:80]} is not a plain name (letters, digits, . _ + ! -)")


def _table(document: dict, *keys: str) -> dict:
    """``document[k1][k2]...``, or {} where a key is missing or not a table."""
    for key in keys:
        document = document.get(key) if isinstance(document, dict) else None
    return document if isinstance(document, dict) else {}


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


def write_launcher(folder: Path, relay: bool = False, api_socket: Path | None = None) -> Path:
    """The ``flwr-clientapp`` an agent's SuperNode finds first on its PATH; returns the folder.
    ``relay``: run ``fedlora.client.relay`` (the agent runs a resident trainer).
    ``api_socket``: the SuperNode's runtime API socket; then a ``flower-superexec`` launcher
    too, and both reach the SuperNode through it, with task tokens in private files."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    launchers = {"flwr-clientapp": f"main(relay={relay!r})"}
    if api_socket is not None:
        launchers = {
            "flwr-clientapp": f"main(relay={relay!r}, api_socket={str(api_socket)!r})",
            "flower-superexec": f"superexec({str(api_socket)!r})",
        }
    for name, call in launchers.items():
        launcher = folder / name
        launcher.write_text(
            f"#!{sys.executable}\nfrom fedlora.deploy.trusted_app import {call.split('(')[0]}\n{call}\n"
        )
        launcher.chmod(0o700)
    return folder


def superexec(api_socket: str) -> None:
    """Flower's ``flower-superexec`` for an agent's SuperNode: it reaches the SuperNode through
    ``api_socket``, hands each ClientApp its token in a file, and acquires ClientApp tasks only."""
    from flwr.supercore.constant import TaskType  # lazy: as in main
    from flwr.supercore.superexec.plugin import AutoExecPlugin  # lazy: as in main

    from fedlora.deploy.local_api import TOKEN_DIR, pass_tokens_in_files, route_to_socket  # lazy: as in main

    route_to_socket(Path(api_socket))
    pass_tokens_in_files(Path(api_socket).parent / TOKEN_DIR)
    # Flower's plugin takes every kind of task, an AgentApp (the bundle's own code, run by
    # Flower's flwr-agentapp) among them: next to the data, only the trusted ClientApp runs
    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})
    from flwr.supercore.cli.flower_superexec import flower_superexec  # lazy: as in main

    sys.argv[0] = "flower-superexec"
    flower_superexec()


def main(relay: bool = False, api_socket: str | None = None) -> None:
    """Flower's ``flwr-clientapp``, with the bundle checked before it is installed."""
    from flwr.supernode.runtime import (
        run_clientapp as runtime,  # lazy: the agent imports this module for write_launcher alone
    )

    if api_socket is not None:
        from fedlora.deploy.local_api import route_to_socket  # lazy: with an API socket only

        route_to_socket(Path(api_socket))
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
    token = try_obtain_flwr_app_token(args)
    if args.token_file is not None:  # the SuperExec's private file, for this process alone
        with contextlib.suppress(OSError):
            Path(args.token_file).unlink()
    run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
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
