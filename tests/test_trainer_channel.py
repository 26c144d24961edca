"""The channel between an agent's relay and its resident trainer: bounded frames, a private
socket, the agent's secret, one request at a time. No torch, no model: a toy handler."""

import os
import socket
import stat
import threading
import time

import pytest

from fedlora.errors import UserError
from fedlora.io import channel
from fedlora.io.channel import Busy, ChannelError


@pytest.fixture
def folder(tmp_path):
    return channel.prepare_dir(channel.channel_dir(tmp_path / "state"))


class Toy:
    """A trainer whose handler reverses each frame, optionally waiting for ``gate`` first."""

    def __init__(self, folder, max_frame_bytes=1000):
        self.calls, self.gate = [], threading.Event()
        self.gate.set()
        self.secret = channel.new_secret(folder)
        self.server = channel.Server(
            channel.listen(folder), self.secret, self.handle, {"train": 2}, max_frame_bytes=max_frame_bytes
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, header, frames):
        self.calls.append(frames)
        assert self.gate.wait(10)
        return [f[::-1] for f in frames]


def test_a_request_and_its_reply(folder, caplog):
    toy = Toy(folder)
    assert channel.request(folder, "train", [b"abc", b""], [10, 10]) == [b"cba", b""]
    assert toy.calls == [[b"abc", b""]]
    assert "dropped" not in caplog.text


def test_a_small_frame_is_one_write():
    """The relay closes as soon as it has read the last frame: a second write of the
    trainer's (an empty frame's empty body) would meet a closed socket."""

    class Recorder:
        def __init__(self):
            self.writes = []

        def sendall(self, data):
            self.writes.append(bytes(data))

    sock = Recorder()
    channel.send_frame(sock, b"")
    channel.send_frame(sock, b"ab")
    assert sock.writes == [channel.LENGTH.pack(0), channel.LENGTH.pack(2) + b"ab"]


def test_the_folder_socket_and_secret_are_private(tmp_path):
    loose = tmp_path / "state" / "trainer"
    loose.mkdir(parents=True, mode=0o755)
    loose.chmod(0o755)
    folder = channel.prepare_dir(loose)  # an existing folder is made private too
    Toy(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / channel.SOCKET_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / channel.SECRET_NAME).stat().st_mode) == 0o600
    assert stat.S_ISSOCK((folder / channel.SOCKET_NAME).stat().st_mode)


def test_a_path_longer_than_a_unix_socket_address_still_works(tmp_path):
    folder = channel.prepare_dir(tmp_path / ("x" * 120) / "trainer")
    assert len(os.fsencode(folder / channel.SOCKET_NAME)) > 108
    Toy(folder)
    assert channel.request(folder, "train", [b"ab", b"c"], [10, 10]) == [b"ba", b"c"]


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trainer").write_text("a file where the folder goes")
    with pytest.raises(UserError, match="cannot .*trainer's socket folder") as info:
        channel.prepare_dir(channel.channel_dir(tmp_path / "state"))
    assert "\n" not in str(info.value)


def closed_unanswered(raw: socket.socket) -> bool:
    raw.settimeout(5)
    try:
        return raw.recv(1) == b""
    except ConnectionResetError:  # closed with our request unread
        return True


@pytest.mark.parametrize("secret", [b"\0" * channel.SECRET_BYTES, b"short", b""])
def test_a_wrong_or_missing_secret_is_closed_without_processing(folder, secret):
    toy = Toy(folder)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(folder / channel.SOCKET_NAME))
        channel.send_frame(raw, secret)
        try:
            channel.send_json(raw, {"v": 1, "op": "train", "frames": 2})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the trainer closed on the secret before our request went out: as it should
        assert closed_unanswered(raw)
    (folder / channel.SECRET_NAME).write_bytes(secret.ljust(channel.SECRET_BYTES, b"!"))
    with pytest.raises(ChannelError, match="closed"):
        channel.request(folder, "train", [b"x", b"y"], [10, 10])
    assert toy.calls == []


def test_a_silent_peer_is_dropped(folder, monkeypatch):
    monkeypatch.setattr(channel, "AUTH_TIMEOUT_S", 0.3)
    toy = Toy(folder)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(folder / channel.SOCKET_NAME))
        assert closed_unanswered(raw)
    assert channel.request(folder, "train", [b"x", b"y"], [10, 10]) == [b"x", b"y"]  # still serving
    assert len(toy.calls) == 1


def test_a_second_request_while_busy_is_refused(folder):
    toy = Toy(folder)
    toy.gate.clear()
    first = {}
    thread = threading.Thread(target=lambda: first.update(r=channel.request(folder, "train", [b"ab", b"c"], [9, 9])))
    thread.start()
    deadline = time.monotonic() + 10
    while not toy.calls and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(Busy, match="busy"):
        channel.request(folder, "train", [b"x", b"y"], [10, 10])
    toy.gate.set()
    thread.join(10)
    assert first["r"] == [b"ba", b"c"] and len(toy.calls) == 1


def test_oversized_frames_are_refused_in_one_line(folder):
    Toy(folder, max_frame_bytes=100)
    with pytest.raises(ChannelError, match="request frame 0 is 5000 bytes, over its limit of 100") as info:
        channel.request(folder, "train", [b"x" * 5000, b"y"], [10_000, 10])
    assert "\n" not in str(info.value)
    with pytest.raises(ChannelError, match="reply frame 0 is 50 bytes, over its limit of 49"):
        channel.request(folder, "train", [b"x" * 50, b"y"], [49, 10])


def test_frame_bounds_are_checked_before_reading():
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(5)
        left.sendall(channel.LENGTH.pack(1 << 40))  # claims a terabyte, sends nothing
        with pytest.raises(ChannelError, match="over its limit of 4096"):
            channel.recv_frame(right, 4096, "header")
        channel.send_frame(left, b"[1, 2]")
        with pytest.raises(ChannelError, match="malformed header: not a JSON object"):
            channel.recv_json(right)
        channel.send_frame(left, b"\xff{")
        with pytest.raises(ChannelError, match="malformed header: not JSON"):
            channel.recv_json(right)
        left.sendall(channel.LENGTH.pack(10) + b"abc")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError, match="closed in the middle of the reply"):
            channel.recv_frame(right, 100, "reply")


def test_a_malformed_request_header_is_refused(folder):
    toy = Toy(folder)
    with pytest.raises(ChannelError, match="malformed request header"):
        channel.request(folder, "evaluate", [b"x", b"y"], [10, 10])
    with pytest.raises(ChannelError, match="malformed request header"):
        channel.request(folder, "train", [b"x"], [10])  # the wrong number of frames
    assert toy.calls == []


def test_no_trainer_is_a_clear_error(folder):
    channel.new_secret(folder)
    with pytest.raises(ChannelError, match="no trainer is listening"):
        channel.request(folder, "train", [b"x", b"y"], [10, 10], wait_s=0.3)


def test_a_trainer_that_dies_mid_request_is_a_clear_error(folder):
    secret = channel.new_secret(folder)
    sock = channel.listen(folder)

    def dies():  # reads the request, then goes away without a reply
        conn, _ = sock.accept()
        assert channel.recv_frame(conn, 64, "secret") == secret
        channel.recv_json(conn)
        channel.send_json(conn, {"status": "ready"})
        channel.recv_frame(conn, 100, "frame")
        channel.recv_frame(conn, 100, "frame")
        conn.close()

    threading.Thread(target=dies, daemon=True).start()
    with pytest.raises(ChannelError, match="closed before the trainer's reply"):
        channel.request(folder, "train", [b"x", b"y"], [10, 10])
    sock.close()
