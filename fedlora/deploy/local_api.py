"""The SuperLink's local HTTP API (control and runtime) on a Unix socket only its owner can open.

Flower 1.39's SuperLink serves its Control API (``flwr run``, ``flwr supernode register``)
and its Runtime API (the ServerApp's and SuperExec's link, formerly ServerAppIo) as one
HTTP service on ``--host``/``--port``, a loopback TCP port that every user of the machine
can reach; the open-source control authentication does nothing, so whoever reached it could
submit a run, whose ServerApp then ran as the operator. Flower offers no Unix-socket option,
but uvicorn serves a listening socket it is handed and httpx connects through one, so:

- the SuperLink (``fedlora.deploy.superlink --api-socket PATH``) binds ``PATH`` itself, 0600
  in a 0700 folder, and has uvicorn serve it; no TCP port is opened for the API;
- every process that talks to it is started through a launcher in the 0700 folder ``bin/``
  beside it (``flwr``, ``flower-superexec``, ``flwr-serverapp``, ``flwr-simulation``), which
  routes Flower's HTTP client (``ProtobufClient``) through the socket. Flower still passes an
  address around: ``127.0.0.1:1`` (``NOMINAL_ADDRESS``), a privileged port no ordinary user can
  listen on, so a process that escaped the routing would fail, never reach a stranger;
- the launcher of SuperExec hands each app process its token in a file (0600, in the 0700
  ``tokens/``, removed once read) instead of on its command line, where any user sees it;
- the launchers of the ServerApp runtimes check the app bundle first (``trusted_server``).

A socket path longer than the kernel's limit (107 bytes) is reached through
``/proc/self/fd/N/NAME``, N a descriptor of its folder.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import socket
import stat
import sys
import time
from pathlib import Path

from fedlora.errors import UserError

NOMINAL_PORT = 1  # what Flower's processes are told; see the module's docstring
NOMINAL_ADDRESS = f"127.0.0.1:{NOMINAL_PORT}"
SOCKET_NAME = "superlink.sock"
SUN_PATH_MAX = 107  # bytes of a socket's path the kernel takes (108 with the terminating NUL)
LAUNCHED = {  # launcher name: Flower's entry point (module, function)
    "flwr": ("flwr.cli.app", "app"),
    "flower-superexec": ("flwr.supercore.cli.flower_superexec", "flower_superexec"),
    "flwr-serverapp": ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp"),
    "flwr-simulation": ("flwr.simulation.app", "flwr_simulation"),
}
TOKEN_DIR = "tokens"


class ApiSocketError(Exception):
    """The API socket cannot be made; the message says why, in one line."""


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (made, or narrowed to 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


_folder_fds: dict[Path, int] = {}


def connectable(path: Path) -> str:
    """A path to ``path`` that fits a socket address: itself, or through a descriptor of
    its folder, held open for this process's life."""
    text = str(path)
    if len(os.fsencode(text)) <= SUN_PATH_MAX:
        return text
    folder = path.parent
    if folder not in _folder_fds:
        _folder_fds[folder] = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{_folder_fds[folder]}/{path.name}"


def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, 0600 from the moment it exists, in a folder only
    this user can enter. A stale socket there (a SuperLink that was killed) is replaced; one
    that answers is another SuperLink's, and refused."""
    folder = private_folder(path.parent)
    if folder.stat().st_uid != os.getuid():
        raise ApiSocketError(f"{folder} belongs to another user")
    address = connectable(path)
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ApiSocketError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(address)
            except OSError:
                path.unlink()  # nothing listens: left by a process that died
            else:
                raise ApiSocketError(f"another SuperLink serves {path}: stop it first")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ApiSocketError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def wait_for_socket(path: Path, proc, timeout_s: float, what: str) -> None:
    """Until the server ``proc`` (a Popen) accepts connections on ``path``; UserError if it
    exits first or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with status {proc.returncode} while starting")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(connectable(path))
                return
            except OSError:
                pass
        time.sleep(0.3)
    raise UserError(f"{what} did not open {path} within {timeout_s:.0f} s")


def serve_http_on(superlink_module, sock: socket.socket) -> None:
    """Have Flower's SuperLink module run its HTTP API (uvicorn) on ``sock`` instead of
    ``--host``/``--port``."""
    import uvicorn  # lazy: only the SuperLink serves

    def run(app, host=None, port=None, **kwargs) -> None:
        uvicorn.run(app, fd=sock.fileno(), **kwargs)

    superlink_module.uvicorn = _Namespace(run=run)
    # the control API's gRPC twin (an internal switch in flwr 1.39) would listen on TCP
    os.environ.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)


class _Namespace:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


def route_to_socket(path: Path) -> None:
    """Every Flower HTTP client this process makes connects through the socket at ``path``,
    whatever address it was given (the address still names the host TLS checks)."""
    import httpx  # lazy: launchers import this module before Flower
    from flwr.supercore.protobuf import client as protobuf_client

    address = connectable(path)
    original = protobuf_client.ProtobufClient.__init__

    def init(self, base_url: str, **kwargs) -> None:
        original(self, base_url, **kwargs)
        self._client.close()
        transport = httpx.HTTPTransport(uds=address, verify=kwargs.get("verify", True))
        # trust_env off: a proxy from the environment would take the request elsewhere
        self._client = httpx.Client(
            transport=transport, timeout=kwargs.get("timeout", 30.0), follow_redirects=True, trust_env=False
        )

    protobuf_client.ProtobufClient.__init__ = init


def pass_tokens_in_files(folder: Path) -> None:
    """SuperExec starts each app process with ``--token T`` on its command line; give it
    ``--token-file F`` instead, F readable by this user alone (the app's launcher removes it)."""
    import subprocess  # lazy: patched into this launcher's process only

    executor = importlib.import_module("flwr.supercore.superexec.executor.subprocess_executor")
    private_folder(folder)

    def popen(args, *rest, **kwargs):
        args = list(args)
        if "--token" in args:
            at = args.index("--token")
            token_file = folder / secrets.token_hex(16)
            with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
                fh.write(args[at + 1])
            args[at : at + 2] = ["--token-file", str(token_file)]
        return subprocess.Popen(args, *rest, **kwargs)

    executor.subprocess = _Namespace(Popen=popen, DEVNULL=subprocess.DEVNULL)


def _consume_token_file(module) -> None:
    """The app's token file is removed as soon as Flower has read it."""
    obtain = module.try_obtain_flwr_app_token

    def obtain_once(args):
        token = obtain(args)
        if getattr(args, "token_file", None):
            with contextlib.suppress(OSError):
                Path(args.token_file).unlink()
        return token

    module.try_obtain_flwr_app_token = obtain_once


def write_launchers(folder: Path, sock: Path, flower_home: Path, simulation: bool = False) -> Path:
    """The launchers (see the module's docstring) in ``folder`` (made 0700); returns it.
    ``flower_home``: the FLWR_HOME of the ``flwr`` launcher, whose config names this SuperLink.
    ``simulation``: the bundle may name fedlora's simulated attacker as its ClientApp."""
    private_folder(folder)
    for name in LAUNCHED:
        launcher = folder / name
        launcher.write_text(
            f"#!{sys.executable}\nfrom fedlora.deploy.local_api import main\n"
            f"main({name!r}, {str(sock)!r}, {str(flower_home)!r}, simulation={simulation!r})\n"
        )
        launcher.chmod(0o700)
    return folder


def main(name: str, sock: str, flower_home: str, simulation: bool = False) -> None:
    """A launcher: Flower's ``name`` command, talking to the SuperLink through ``sock``."""
    route_to_socket(Path(sock))
    module_name, function = LAUNCHED[name]
    if name == "flwr":
        os.environ["FLWR_HOME"] = flower_home  # whose config.toml names this SuperLink
    elif name == "flower-superexec":
        pass_tokens_in_files(Path(sock).parent / TOKEN_DIR)
    else:
        from fedlora.deploy.trusted_server import refuse_untrusted_bundles  # lazy: ServerApp launchers only

        runtime = "flwr.superlink.runtime.run_serverapp" if name == "flwr-serverapp" else module_name
        refuse_untrusted_bundles(importlib.import_module(runtime), simulation)
        _consume_token_file(importlib.import_module(module_name))
    sys.argv[0] = name
    entry = getattr(importlib.import_module(module_name), function)
    sys.exit(entry())
