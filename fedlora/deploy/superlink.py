"""Flower's SuperLink with the client-facing (Fleet API) gRPC message size capped.

``flower-superlink`` in flwr 1.39 accepts gRPC messages of up to 2 GB from any client and
has no option to lower that; fedlora's own payload limit applies only after such a
message has been received and handed on. This entry point sets the module constant the
Fleet API server is built with, then runs Flower's own SuperLink:

    python -m fedlora.deploy.superlink --max-message-bytes N [flower-superlink options]
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--max-message-bytes" or not args[1].isdigit() or int(args[1]) < 1:
        sys.exit("usage: python -m fedlora.deploy.superlink --max-message-bytes N [flower-superlink options]")
    # the module, not the function of the same name that its package re-exports
    superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    superlink.GRPC_MAX_MESSAGE_LENGTH = int(args[1])  # read when the Fleet API server is built
    sys.argv = ["flower-superlink", *args[2:]]
    superlink.flower_superlink()


if __name__ == "__main__":
    main()
