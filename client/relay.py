"""A deployed agent's ClientApp: a thin relay to the agent's resident trainer.

Flower 1.39's SuperNode starts a fresh ClientApp process for every message. Rather than
load torch, the base model and the data again in each, ``fedlora client`` runs one
long-lived trainer (``fedlora.deploy.trainer``) that keeps them loaded, and its trusted
launcher (``fedlora.deploy.trusted_app``) runs this relay in place of
``fedlora.client.app``. The relay hands the message and the node's context to the trainer
over the agent's local channel (``fedlora.io.channel``) and returns the trainer's reply and
the node state the trainer updated; the trainer runs the very handler
``fedlora.client.handler.train``. Whatever goes wrong on the way is a decline with a short
code (``agent-busy``, ``agent-error``), never an exception the coordinator would see.

This module imports no torch: it is the whole of what each per-message process loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

from fedlora.flower.messages import AGENT_BUSY, AGENT_ERROR, RECORD, decline
from fedlora.io.channel import Busy, ChannelError, channel_dir, request
from fedlora.untrusted import one_line

app = ClientApp()
log = logging.getLogger("fedlora")

OP_TRAIN = "train"
REQUEST_FRAMES = 2  # the message, the context
MB = 1024 * 1024
SLACK = MB  # reply frames: headers, metrics and the node state's own records
DEFAULT_MAX_UPDATE_MB = 64  # RunConfig's default, for a request whose settings cannot be read
CONNECT_WAIT_S = 60.0  # a trainer that is being restarted by the agent gets this long


def encode_request(msg: Message, context: Context) -> list[bytes]:
    return [message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()]


def decode_request(frames: list[bytes]) -> tuple[Message, Context]:
    """Raises ValueError on frames that are not a message and a context."""
    try:
        msg = message_from_proto(ProtoMessage.FromString(frames[0]))
        context = context_from_proto(ProtoContext.FromString(frames[1]))
    except (DecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed request: {one_line(str(exc))}") from None
    if not msg.has_content():
        raise ValueError("malformed request: a message without content")
    return msg, context


def encode_reply(reply: Message, context: Context) -> list[bytes]:
    return [
        recorddict_to_proto(reply.content).SerializeToString(),
        recorddict_to_proto(context.state).SerializeToString(),
    ]


def decode_reply(frames: list[bytes]) -> tuple[RecordDict, RecordDict]:
    try:
        return tuple(recorddict_from_proto(ProtoRecordDict.FromString(f)) for f in frames)  # type: ignore[return-value]
    except (DecodeError, TypeError, ValueError) as exc:
        raise ChannelError(f"malformed reply from the trainer: {one_line(str(exc))}") from None


def max_update_bytes(msg: Message) -> int:
    """The run's bound on a client's update (``--max-update-mb``), read without trusting it."""
    try:
        settings = json.loads(str(msg.content[RECORD]["run_config"]))
        mb = int(settings.get("max_update_mb", DEFAULT_MAX_UPDATE_MB))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError):  # inf; "[[[..."
        mb = DEFAULT_MAX_UPDATE_MB
    return max(1, min(mb, 1 << 20)) * MB


def exchange(msg: Message, context: Context) -> tuple[RecordDict, RecordDict]:
    """The trainer's reply content and the node state after it, for this message.

    Bounds: the reply is an update within the run's limit; the state is what the node
    held plus, at most, what this message carried (tensors kept between rounds)."""
    folder = channel_dir(Path(str(context.node_config["state-dir"])))
    frames = encode_request(msg, context)
    limits = [max_update_bytes(msg) + SLACK, len(frames[0]) + len(frames[1]) + SLACK]
    return decode_reply(request(folder, OP_TRAIN, frames, limits, wait_s=CONNECT_WAIT_S))


@app.train()
def relay(msg: Message, context: Context) -> Message:
    try:
        content, state = exchange(msg, context)
    except Busy:
        log.warning("declined a message: the trainer is busy with another one")
        return decline(msg, AGENT_BUSY, None)
    except (ChannelError, KeyError) as exc:
        log.warning("declined a message: %s", one_line(str(exc)))
        return decline(msg, AGENT_ERROR, None)
    context.state = state
    return Message(content, reply_to=msg)
