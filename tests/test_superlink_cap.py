"""The coordinator's SuperLink refuses a client's gRPC message above the run's cap before
reading it (flwr 1.39's own SuperLink takes up to 2 GB), and still serves smaller ones."""

import subprocess
import sys

import grpc
import pytest

from fedlora.deploy.coordinator import superlink_message_cap
from fedlora.deploy.processes import child_env, free_loopback_port, start, stop, wait_for_port

CAP = 200_000


@pytest.fixture
def capped_superlink(tmp_path):
    fleet, control = free_loopback_port(), free_loopback_port()
    cmd = [
        sys.executable,
        "-m",
        "fedlora.deploy.superlink",
        "--max-message-bytes",
        str(CAP),
        "--max-reply-bytes",
        str(CAP),
        "--max-reply-objects",
        "16",
        "--insecure",
        "--fleet-api-address",
        f"127.0.0.1:{fleet}",
        "--host",
        "127.0.0.1",
        "--port",
        str(control),
        "--disable-runtime-dependency-installation",
        "--database",
        str(tmp_path / "state.db"),
    ]
    # under fedlora's guard in a session of its own, as the coordinator runs it: stopping it
    # stops the executor the SuperLink starts too
    proc = start(cmd, child_env(tmp_path), tmp_path / "superlink.log")
    try:
        wait_for_port("127.0.0.1", fleet, proc, 60.0, "the SuperLink")
        yield f"127.0.0.1:{fleet}"
    finally:
        stop(proc)


def call_fleet(address: str, size: int) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        create_node = channel.unary_unary("/flwr.proto.Fleet/CreateNode")  # raw bytes in, raw bytes out
        try:
            create_node(b"\x0a" + b"\x00" * (size - 1), timeout=20)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_messages_above_the_cap_are_refused_unread(capped_superlink):
    assert call_fleet(capped_superlink, 2 * CAP) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call_fleet(capped_superlink, CAP // 2) != grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_cap_follows_the_update_limit():
    assert superlink_message_cap(64) == 128 * 1024 * 1024


@pytest.mark.parametrize(
    "limits",
    [
        ["--max-message-bytes", "lots"],
        ["--max-message-bytes", "9", "--max-reply-bytes", "9"],  # every bound is required
        ["--max-message-bytes", "9", "--max-reply-bytes", "9", "--max-reply-objects", "0"],
        ["--max-message-bytes", "9", "--max-reply-bytes", "9", "--max-reply-objects", "9", "--max-reply-bytes", "9"],
        # the reply bound covers the gRPC-rere Fleet API only
        [
            "--max-message-bytes",
            "9",
            "--max-reply-bytes",
            "9",
            "--max-reply-objects",
            "9",
            "--fleet-api-type",
            "grpc-adapter",
        ],
    ],
)
def test_a_bad_cap_is_one_line(limits):
    proc = subprocess.run([sys.executable, "-m", "fedlora.deploy.superlink", *limits], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("usage:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
