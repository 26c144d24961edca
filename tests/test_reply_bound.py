"""The coordinator's SuperLink bounds each reply in total, objects and bytes, before the
ServerApp can inflate it: a real SuperLink process, a modified client that speaks the
Fleet API directly, and this test standing in for the ServerApp (it reads the SuperLink's
database as the ServerApp's Runtime API does)."""

import functools
import sys
import time

import grpc
import pytest
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.client.grpc_rere_client.connection import grpc_request_response
from flwr.client.grpc_rere_client.node_auth_client_interceptor import NodeAuthClientInterceptor
from flwr.common.constant import NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.proto import fleet_pb2, fleet_pb2_grpc, message_pb2, node_pb2
from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    iterate_object_tree,
    push_object_contents_from_iterable,
)
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supercore.retry.grpc_retry import make_simple_grpc_retry_invoker
from flwr.superlink.config_loader import get_objectstore_linkstate_factories
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

from fedlora.deploy.coordinator import MAX_REPLY_OBJECTS
from fedlora.deploy.processes import child_env, free_loopback_port, start, stop, wait_for_port
from fedlora.flower.messages import RECORD, decline

MESSAGE_CAP = 200_000  # per gRPC message
REPLY_BYTES = 300_000  # per reply, all its objects
OBJECTS = 16
PART = 90_000  # one object's payload: well under the per-message cap


class Link:
    """The SuperLink as a ServerApp sees it (its database) and as a client node sees it."""

    def __init__(self, database: str, fleet: str, log_path) -> None:
        self.address = fleet
        _, factory = get_objectstore_linkstate_factories(database, NoOpFederationManager())
        self.state, self.log_path = factory.state(), log_path
        self.run_id = self.state.create_run(
            None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
        )
        task = self.state.get_run_info(run_ids=[self.run_id])[0].primary_task_id
        assert self.state.claim_task(task) is not None and self.state.activate_task(task)
        keys = generate_key_pairs()  # flwr 1.39 signs every Fleet call with the node's key
        self.channel = grpc.intercept_channel(grpc.insecure_channel(fleet), NodeAuthClientInterceptor(*keys))
        self.fleet = fleet_pb2_grpc.FleetStub(self.channel)
        key = public_key_to_bytes(keys[1])
        self.fleet.RegisterNode(fleet_pb2.RegisterNodeFleetRequest(public_key=key))
        node_id = self.fleet.ActivateNode(fleet_pb2.ActivateNodeRequest(public_key=key, heartbeat_interval=60)).node_id
        self.node = node_pb2.Node(node_id=node_id)

    def instruct(self, node_id: int | None = None) -> Message:
        """An instruction to the node (or to ``node_id``), as the ServerApp sends one."""
        metadata = Metadata(
            run_id=self.run_id,
            message_id="",
            src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=node_id or self.node.node_id,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=600.0,
            message_type="train",
        )
        msg = make_message(metadata=metadata, content=RecordDict({"fedlora": ConfigRecord({"at": time.time()})}))
        msg.metadata.__dict__["_message_id"] = msg.object_id
        assert self.state.store_message_ins(msg)
        self.state.object_store.preregister(self.run_id, get_object_tree(msg))
        for oid, obj in get_all_nested_objects(msg).items():
            self.state.object_store.put(oid, obj.deflate())
        return msg

    def reply(self, ins: Message, content: RecordDict, claim=lambda: None, as_id: str = "") -> grpc.RpcError | None:
        """Push a reply as a SuperNode does (the message and its tree, then each object the
        SuperLink asks for); ``claim`` runs once the reply is declared. ``as_id``: the id
        the reply claims, if not its own. The refusal, if any."""
        reply = Message(content, reply_to=ins)
        tree, objects = get_object_tree(reply), get_all_nested_objects(reply)
        reply.metadata.__dict__["_message_id"] = as_id or reply.object_id
        try:
            res = self.fleet.PushMessages(
                fleet_pb2.PushMessagesRequest(
                    node=self.node,
                    messages_list=[message_to_proto(remove_content_from_message(reply))],
                    message_object_trees=[tree],
                )
            )
            claim()
            for oid in res.objects_to_push:
                push = message_pb2.PushObjectRequest(
                    node=self.node,
                    run_id=self.run_id,
                    object_id=oid,
                    object_content=objects[oid].deflate(),
                    session_id=res.session_id,
                )
                assert self.fleet.PushObject(push).stored
        except grpc.RpcError as exc:
            return exc
        return None

    def pull(self, ins: Message) -> list[Message]:
        """What the ServerApp pulls for ``ins``: its replies, inflated."""
        pulled = []
        for msg in self.state.get_message_res({ins.metadata.message_id}, self.run_id):
            tree = self.state.object_store.get_object_tree(msg.metadata.message_id)
            contents = {t.object_id: self.state.get_object(self.run_id, t.object_id) for t in iterate_object_tree(tree)}
            pulled.append(inflate_object_from_contents(msg.metadata.message_id, contents))
        return pulled

    def log_lines(self, marker: str, count: int = 1) -> list[str]:
        """The SuperLink's log lines with ``marker``, once there are ``count`` (or after 5 s)."""
        deadline = time.monotonic() + 5.0
        while True:
            lines = [line for line in self.log_path.read_text().splitlines() if marker in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reply-bound")
    fleet, control = free_loopback_port(), free_loopback_port()
    cmd = [sys.executable, "-m", "fedlora.deploy.superlink", "--max-message-bytes", str(MESSAGE_CAP)]
    cmd += ["--max-reply-bytes", str(REPLY_BYTES), "--max-reply-objects", str(OBJECTS)]
    cmd += ["--insecure", "--isolation", "process"]  # no ServerApp: this test plays it
    cmd += ["--fleet-api-address", f"127.0.0.1:{fleet}", "--host", "127.0.0.1", "--port", str(control)]
    cmd += ["--disable-runtime-dependency-installation", "--database", str(tmp / "state.db")]
    proc = start(cmd, child_env(tmp), tmp / "superlink.log")
    try:
        wait_for_port("127.0.0.1", fleet, proc, 60.0, "the SuperLink")
        link = Link(str(tmp / "state.db"), f"127.0.0.1:{fleet}", tmp / "superlink.log")
        yield link
        link.channel.close()
    finally:
        stop(proc)


def payload(tag: str, size: int = PART) -> ConfigRecord:
    return ConfigRecord({"payload": tag.encode() * (size // len(tag))})


def assert_refused(exc: grpc.RpcError | None, why: str) -> None:
    assert exc is not None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.details().startswith("reply refused: ") and why in exc.details() and "\n" not in exc.details()


def test_an_ordinary_reply_goes_through(link):
    ins = link.instruct()
    content = RecordDict({"fedlora": payload("ordinary"), "metrics": MetricRecord({"epsilon": 1.0})})
    assert link.reply(ins, content) is None
    (got,) = link.pull(ins)
    assert got.content["fedlora"]["payload"] == content["fedlora"]["payload"]


def test_a_supernodes_own_upload_goes_through(link):
    """Flwr's own SuperNode code: its connection, its PullMessages, its concurrent pushes."""
    content = RecordDict({"fedlora": payload("supernode"), "metrics": MetricRecord({"epsilon": 2.0})})
    with grpc_request_response(link.address, True, make_simple_grpc_retry_invoker()) as connection:
        node_id, receive, send, _, _, _, push_object, _ = connection
        ins = link.instruct(node_id)
        received, _ = receive()
        reply = Message(content, reply_to=received)
        reply.metadata.__dict__["_message_id"] = reply.object_id
        ids, session = send(reply, get_object_tree(reply), 0.1)
        objects = get_all_nested_objects(reply)
        push_object_contents_from_iterable(
            ((oid, objects[oid].deflate()) for oid in ids), functools.partial(push_object, link.run_id, session)
        )
        (got,) = link.pull(ins)  # while the node is online (once it leaves, its replies are errors)
    assert got.content["fedlora"]["payload"] == content["fedlora"]["payload"]


def test_a_reply_of_many_small_objects_is_refused_before_it_is_stored(link):
    ins = link.instruct()
    content = RecordDict({f"part{i}": ConfigRecord({"i": i}) for i in range(5 * OBJECTS)})
    assert_refused(link.reply(ins, content), f"more than {OBJECTS} objects (--max-reply-objects)")
    assert link.pull(ins) == []
    (line,) = link.log_lines(f"more than {OBJECTS} objects")
    assert f"refused a reply from node {link.node.node_id}" in line


def test_a_reply_past_the_byte_bound_is_dropped_even_once_claimed(link):
    ins, logged = link.instruct(), len(link.log_lines("(--max-reply-bytes)", 0))
    content = RecordDict({f"part{i}": payload(f"big{i}") for i in range(5)})  # each object under the caps
    claimed: list[Message] = []
    # a ServerApp polling for replies sees this one as soon as it is declared
    exc = link.reply(
        ins, content, claim=lambda: claimed.extend(link.state.get_message_res({ins.metadata.message_id}, link.run_id))
    )
    assert_refused(exc, f"more than {REPLY_BYTES} bytes (--max-reply-bytes)")
    assert len(claimed) == 1
    # its pull can never complete: the reply's objects are gone
    assert link.state.get_object(link.run_id, claimed[0].metadata.message_id) is None
    assert link.pull(ins) == []
    assert len(link.log_lines("(--max-reply-bytes)", logged + 1)) == logged + 1


def test_a_reply_that_names_another_tree_is_refused(link):
    ins = link.instruct()
    # the ServerApp would pull the tree of the id, here the instruction's own, unbounded
    exc = link.reply(ins, RecordDict({"fedlora": payload("alias")}), as_id=ins.metadata.message_id)
    assert_refused(exc, "not the root of its object tree")
    assert link.pull(ins) == []


def test_objects_already_held_count_towards_a_reply(link):
    first, second = link.instruct(), link.instruct()
    logged = len(link.log_lines("(--max-reply-bytes)", 0))
    held = {f"part{i}": payload(f"held{i}") for i in range(3)}  # about 270 kB, stays in the store
    assert link.reply(first, RecordDict(held)) is None
    # only the new part travels, but the reply is the held parts and it
    exc = link.reply(second, RecordDict({**held, "part3": payload("new")}))
    assert_refused(exc, "(--max-reply-bytes)")
    assert link.pull(second) == []
    assert len(link.pull(first)) == 1
    assert len(link.log_lines("(--max-reply-bytes)", logged + 1)) == logged + 1


def test_fedlora_replies_are_well_within_the_object_bound():
    """An update (client/handler.py: the payload and the metrics) and a decline are 4 objects."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=100.0,
        message_type="train",
    )
    ins = make_message(metadata=metadata, content=RecordDict({RECORD: ConfigRecord({"x": 1})}))
    ins.metadata.__dict__["_message_id"] = ins.object_id
    update = RecordDict({RECORD: payload("x", 10), "metrics": MetricRecord({"loss": 1.0, "epsilon": 1.0})})
    for reply in (Message(update, reply_to=ins), decline(ins, "agent-busy", 1.0)):
        assert sum(1 for _ in iterate_object_tree(get_object_tree(reply))) * 4 <= MAX_REPLY_OBJECTS
