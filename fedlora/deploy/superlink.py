"""Flower's SuperLink with what an agent can send bounded: each gRPC message, and each reply.

``flower-superlink`` in flwr 1.39 accepts gRPC messages of up to 2 GB from any client and
has no option to lower that; fedlora's own payload limit applies only after such a
message has been received and handed on. Worse, a reply travels as an object tree (one
``PushMessages`` declaring the tree, then one ``PushObject`` per object) with no limit on
the number of objects, and the ServerApp pulls and inflates the whole tree before
fedlora's bridge sees it. This entry point sets the module constant the Fleet API server
is built with (the per-message cap) and has it built with a servicer that bounds each
reply's tree (objects, and bytes in all), then runs Flower's own SuperLink:

    python -m fedlora.deploy.superlink --max-message-bytes N --max-reply-bytes N
        --max-reply-objects N [--api-socket PATH] [flower-superlink options]

A tree with too many objects is refused at ``PushMessages``, before the reply is stored.
Bytes are known only as objects arrive: the push that would take a reply past its bound
is refused unstored, and the reply is dropped (its objects and its record, as flwr does
for an upload that expired), so the ServerApp can never complete pulling it; a pull
already under way ends with Flower's own "unavailable" error reply.

With ``--api-socket PATH`` the SuperLink's local HTTP API (control and runtime) listens on a
Unix socket only its owner can open instead of ``--host``/``--port``
(``fedlora.deploy.local_api``), and its Control API refuses an app bundle other than
fedlora's own when it is submitted (``fedlora.deploy.trusted_server``).
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import NoReturn

import grpc
from flwr.proto.fleet_pb2 import PushMessagesRequest, PushMessagesResponse
from flwr.proto.message_pb2 import ObjectTree, PushObjectRequest, PushObjectResponse
from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore import log
from flwr.supercore.constant import OBJECT_PUSH_SESSION_TTL_SECONDS
from flwr.supercore.inflatable.inflatable_object import get_object_id
from flwr.supercore.object_store import ObjectStoreFactory

from fedlora.deploy.local_api import ApiSocketError, bind_private_socket, serve_http_on
from fedlora.deploy.trusted_server import refuse_at_submission

OPTIONS = ("--max-message-bytes", "--max-reply-bytes", "--max-reply-objects")
SOCKET_OPTION = "--api-socket"
USAGE = (
    f"usage: python -m fedlora.deploy.superlink {' N '.join(OPTIONS)} N [{SOCKET_OPTION} PATH] "
    "[flower-superlink options]"
)


@dataclass
class Upload:
    """One reply on its way in: bytes of its tree known so far, objects not yet seen."""

    node_id: int
    root: str  # the reply's message id
    left: set[str]
    taken: int
    seen: float = field(default_factory=time.monotonic)
    refused: str = ""  # the reason, once refused; later pushes get it too


def tree_ids(trees: Iterable[ObjectTree], limit: int) -> list[str] | None:
    """The object id of every node of ``trees``, or None past ``limit`` nodes."""
    ids: list[str] = []
    stack = list(trees)
    while stack:
        tree = stack.pop()
        ids.append(tree.object_id)
        if len(ids) > limit:
            return None
        stack.extend(tree.children)
    return ids


class BoundedFleetServicer(FleetServicer):
    """Flower's Fleet API servicer, refusing a reply past ``max_bytes`` or ``max_objects``."""

    def __init__(
        self,
        state_factory: LinkStateFactory,
        objectstore_factory: ObjectStoreFactory,
        enable_supernode_auth: bool,
        *,
        max_bytes: int,
        max_objects: int,
    ) -> None:
        super().__init__(state_factory, objectstore_factory, enable_supernode_auth)
        self.max_bytes, self.max_objects = max_bytes, max_objects
        self.too_many_bytes = f"more than {max_bytes} bytes (--max-reply-bytes)"
        self.too_many_objects = f"more than {max_objects} objects (--max-reply-objects)"
        self.uploads: dict[str, Upload] = {}  # by push session id
        self.uploads_lock = threading.Lock()

    def PushMessages(self, request: PushMessagesRequest, context: grpc.ServicerContext) -> PushMessagesResponse:
        node_id, trees = request.node.node_id, request.message_object_trees
        # flwr stores the first message under its own id and the first tree: they must agree,
        # or the ServerApp would pull whatever other tree that id names
        if len(request.messages_list) != 1 or len(trees) != 1:
            self.refuse(context, node_id, "a push of other than one reply and its object tree")
        if request.messages_list[0].metadata.message_id != trees[0].object_id:
            self.refuse(context, node_id, "a reply whose id is not the root of its object tree")
        ids = tree_ids(trees, self.max_objects)
        if ids is None:
            self.refuse(context, node_id, self.too_many_objects)
        # a tree may name objects the store holds already: they count, and are never pushed
        taken, left = self.known_bytes(set(ids))
        if taken > self.max_bytes:
            self.refuse(context, node_id, self.too_many_bytes)
        res = super().PushMessages(request, context)
        # ... and ones that arrived in between
        more, left = self.known_bytes(left - set(res.objects_to_push))
        upload = Upload(node_id, ids[0], left | set(res.objects_to_push), taken + more)
        with self.uploads_lock:
            now = time.monotonic()
            for sid in [s for s, u in self.uploads.items() if now - u.seen > OBJECT_PUSH_SESSION_TTL_SECONDS]:
                del self.uploads[sid]
            self.uploads[res.session_id] = upload
        if upload.taken > self.max_bytes:
            upload.refused = self.too_many_bytes
            self.drop(res.session_id, upload)
            self.refuse(context, node_id, upload.refused)
        return res

    def PushObject(self, request: PushObjectRequest, context: grpc.ServicerContext) -> PushObjectResponse:
        node_id, oid, size = request.node.node_id, request.object_id, len(request.object_content)
        # an id is the hash of the content: an object's size is then the same whoever pushes it
        if get_object_id(request.object_content) != oid:
            self.refuse(context, node_id, "an object whose content does not match its id")
        over: list[tuple[str, Upload]] = []
        with self.uploads_lock:
            own = self.uploads.get(request.session_id)  # flwr 1.39's SuperNodes always name it
            if own is not None and not own.refused:
                # an object counts towards every reply whose tree names it
                for sid, upload in self.uploads.items():
                    if oid in upload.left and not upload.refused:
                        upload.left.discard(oid)
                        upload.taken += size
                        upload.seen = time.monotonic()
                        if upload.taken > self.max_bytes:
                            upload.refused = self.too_many_bytes
                            over.append((sid, upload))
        for sid, upload in over:
            if upload is not own:
                log(WARNING, "[fedlora] dropped a reply from node %s: %s", upload.node_id, upload.refused)
            self.drop(sid, upload)
        if own is None:
            self.refuse(context, node_id, "an object outside any reply this SuperLink is receiving")
        if own.refused:
            self.refuse(context, node_id, own.refused)
        return super().PushObject(request, context)

    def known_bytes(self, ids: set[str]) -> tuple[int, set[str]]:
        """Bytes of the objects in ``ids`` that the store holds, and the ids of the rest."""
        store = self.objectstore_factory.store()
        taken, rest = 0, set()
        for oid in ids:
            content = store.get(oid)
            if content:
                taken += len(content)
            else:
                rest.add(oid)
        return taken, rest

    def drop(self, session_id: str, upload: Upload) -> None:
        """Remove a reply as flwr removes one whose upload expired: its objects, its record."""
        state = self.state_factory.state()
        state._cleanup_push_session(session_id, cleanup_messages=False)  # no more objects for it
        # flwr's session may have ended already (every object it pushed stored), so directly
        state.object_store.delete(upload.root)
        state._on_push_session_expired({upload.root})

    @staticmethod
    def refuse(context: grpc.ServicerContext, node_id: int, reason: str) -> NoReturn:
        log(WARNING, "[fedlora] refused a reply from node %s: %s", node_id, reason)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"reply refused: {reason}")
        raise AssertionError("unreachable: abort raises")


def parse(args: list[str]) -> tuple[dict[str, int], Path | None, list[str]]:
    """fedlora's limits (each once, each a positive integer), its API socket (None: Flower's
    TCP port) and the rest, for Flower."""
    limits: dict[str, int] = {}
    api_socket: Path | None = None
    while args and args[0] in (*OPTIONS, SOCKET_OPTION):
        if len(args) < 2:
            sys.exit(USAGE)
        if args[0] == SOCKET_OPTION:
            if api_socket is not None or not args[1]:
                sys.exit(USAGE)
            api_socket = Path(args[1])
        elif not args[1].isdigit() or int(args[1]) < 1 or args[0] in limits:
            sys.exit(USAGE)
        else:
            limits[args[0]] = int(args[1])
        args = args[2:]
    # the reply bound is on the gRPC-rere Fleet API; Flower's GrpcAdapter one would bypass it
    if len(limits) < len(OPTIONS) or any(a == "grpc-adapter" or a.endswith("=grpc-adapter") for a in args):
        sys.exit(USAGE)
    return limits, api_socket, args


def main(argv: Sequence[str] | None = None) -> None:
    limits, api_socket, rest = parse(list(sys.argv[1:] if argv is None else argv))
    # the module, not the function of the same name that its package re-exports
    superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    superlink.GRPC_MAX_MESSAGE_LENGTH = limits["--max-message-bytes"]  # read when the Fleet API server is built
    superlink.FleetServicer = functools.partial(  # so is this name
        BoundedFleetServicer, max_bytes=limits["--max-reply-bytes"], max_objects=limits["--max-reply-objects"]
    )
    if api_socket is not None:
        try:
            sock = bind_private_socket(api_socket)
        except ApiSocketError as exc:
            sys.exit(f"fedlora: the SuperLink's API socket: {exc}")
        serve_http_on(superlink, sock)
        control = importlib.import_module("flwr.superlink.servicer.control.control_handlers")
        refuse_at_submission(control, simulation="--simulation" in rest)
    sys.argv = ["flower-superlink", *rest]
    superlink.flower_superlink()


if __name__ == "__main__":
    main()
