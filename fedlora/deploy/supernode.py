"""Flower's SuperNode, looking for work more often than every 3 s.

``flower-supernode`` in flwr 1.39 sleeps 3 s after every pull from the SuperLink that
brings no message, and 0.5 s between looks for its ClientApp's reply, with no option to
change either: a round waits 1.5 s on average before an agent even sees its message.
This entry point cuts the waits for a reply to ``--poll-s`` seconds, and the idle polls
too for ``FAST_WINDOW_S`` after the agent last worked (when the next round's message is
due: the coordinator aggregates and evaluates in between); after that it polls every
3 s as Flower does. Then it runs Flower's own SuperNode:

    python -m fedlora.deploy.supernode --poll-s S [flower-supernode options]

So an agent that has just replied asks for the next message every S seconds for a
while, and a long-idle agent costs the SuperLink no more requests than Flower's own.

    python -m fedlora.deploy.supernode --poll-s S --api-socket PATH [flower-supernode options]

serves the SuperNode's runtime API (what its SuperExec and ClientApp processes call: task
tokens, the coordinator's messages, the node's context, replies) on a Unix socket at PATH,
0600 in a 0700 folder, instead of on ``--host``/``--port``: flwr 1.39 serves it over HTTP on
a loopback TCP port, unauthenticated in its subprocess isolation, so any user of the machine
could acquire a task there and answer for the agent. Flower is told ``127.0.0.1:1``
(``local_api.NOMINAL_ADDRESS``), which it passes on to the processes it starts; the agent's
launchers (``fedlora.deploy.trusted_app``) route their HTTP client through PATH instead.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

MODULE = "flwr.supernode.start_client_internal"  # its loop calls time.sleep(3) and time.sleep(0.5)


IDLE_POLL_S = 3.0  # the loop's sleep after a pull that brought no message
FAST_WINDOW_S = 10.0  # idle polls stay short this long after the agent last worked


class ShortSleeps:
    """The ``time`` module, with shorter sleeps: at most ``poll_s`` while the agent works
    (any sleep shorter than the idle poll) and for ``FAST_WINDOW_S`` after; Flower's own
    idle poll after that."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s
        self.worked = time.monotonic()  # when the agent last worked (or started)

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < IDLE_POLL_S:
            self.worked = time.monotonic()
            time.sleep(min(seconds, self.poll_s))
        elif time.monotonic() - self.worked < FAST_WINDOW_S:
            time.sleep(min(seconds, self.poll_s))
        else:
            time.sleep(seconds)


USAGE = "usage: python -m fedlora.deploy.supernode --poll-s S (0.05..3) [--api-socket PATH] [flower-supernode options]"


def parse(args: list[str]) -> tuple[float, Path | None, list[str]]:
    """The poll interval, the API socket (None: Flower's TCP port) and the rest, for Flower."""
    try:
        poll_s = float(args[1]) if len(args) >= 2 and args[0] == "--poll-s" else 0.0
    except ValueError:
        poll_s = 0.0
    if not 0.05 <= poll_s <= 3.0:
        sys.exit(USAGE)
    args = args[2:]
    if args[:1] != ["--api-socket"]:
        return poll_s, None, args
    if len(args) < 2 or not args[1] or "--api-socket" in args[2:]:
        sys.exit(USAGE)
    return poll_s, Path(args[1]), args[2:]


def serve_runtime_api_on(cli, sock) -> None:
    """Have Flower's SuperNode module run its runtime HTTP API (uvicorn) on the listening
    socket ``sock`` instead of ``--host``/``--port``."""
    import uvicorn  # lazy: only the SuperNode serves

    def config(*, host=None, port=None, **kwargs):
        return uvicorn.Config(fd=sock.fileno(), **kwargs)

    cli.uvicorn = _Namespace(Server=uvicorn.Server, Config=config)


class _Namespace:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


def main(argv: Sequence[str] | None = None) -> None:
    poll_s, api_socket, rest = parse(list(sys.argv[1:] if argv is None else argv))
    internal = importlib.import_module(MODULE)
    internal.time = ShortSleeps(poll_s)
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    if api_socket is not None:
        from fedlora.deploy.local_api import (
            NOMINAL_PORT,
            ApiSocketError,
            bind_private_socket,
        )  # lazy: --api-socket only

        try:
            sock = bind_private_socket(api_socket)
        except ApiSocketError as exc:
            sys.exit(f"fedlora client: refused to start the SuperNode: its API socket: {exc}")
        serve_runtime_api_on(cli, sock)
        rest = [*rest, "--host", "127.0.0.1", "--port", str(NOMINAL_PORT)]  # last: argparse keeps the last
    sys.argv = ["flower-supernode", *rest]
    cli.flower_supernode()


if __name__ == "__main__":
    main()
