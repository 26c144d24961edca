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
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        poll_s = float(args[1]) if len(args) >= 2 and args[0] == "--poll-s" else 0.0
    except ValueError:
        poll_s = 0.0
    if not 0.05 <= poll_s <= 3.0:
        sys.exit("usage: python -m fedlora.deploy.supernode --poll-s S (0.05..3) [flower-supernode options]")
    internal = importlib.import_module(MODULE)
    internal.time = ShortSleeps(poll_s)
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    sys.argv = ["flower-supernode", *args[2:]]
    cli.flower_supernode()


if __name__ == "__main__":
    main()
