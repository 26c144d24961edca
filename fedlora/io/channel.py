"""The local channel between a deployed agent's ClientApp relay and its resident trainer.

One Unix socket, ``trainer.sock`` (0600), in a 0700 folder ``trainer/`` under the agent's
state folder. A peer proves that it belongs to this agent with the agent's secret
(``trainer/secret``: 32 random bytes, 0600, new each time the agent starts), compared in
constant time. Everything on the socket is a frame: an 8-byte big-endian length, then
that many bytes. Every read names its bound and refuses a longer frame before reading
it, with a one-line ``ChannelError``.

One request per connection:

    relay   -> trainer  the secret                              (exactly SECRET_BYTES)
    relay   -> trainer  header: JSON {"v": 1, "op": "train", "frames": N}   (<= HEADER_LIMIT)
    trainer -> relay    {"status": "ready"} | {"status": "busy"} | {"status": "error", ...}
    relay   -> trainer  N frames                                (each <= the trainer's bound)
    trainer -> relay    {"status": "ok", "frames": M} then M frames | {"status": "error", "reason": R}

A wrong or missing secret is closed without a word and nothing is processed; a request
while another is being served is told ``busy``. No Flower, no torch: the relay imports
this in every ClientApp process.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from fedlora.errors import UserError
from fedlora.untrusted import one_line

VERSION = 1
SECRET_BYTES = 32
HEADER_LIMIT = 4096
LENGTH = struct.Struct(">Q")
DIR_NAME, SOCKET_NAME, SECRET_NAME = "trainer", "trainer.sock", "secret"
AUTH_TIMEOUT_S = 10.0  # a peer that does not show the secret by then is dropped
IO_TIMEOUT_S = 120.0  # any one frame, once a request is under way
MAX_UNIX_PATH = 100  # sun_path holds 108 bytes; longer paths are reached through /proc/self/fd

log = logging.getLogger("fedlora")

Handler = Callable[[dict, list[bytes]], list[bytes]]


class ChannelError(Exception):
    """A refused, broken or malformed exchange; the message is one line."""


class Busy(ChannelError):
    """The trainer is serving another request."""


# ----- the folder, the secret and the socket ---------------------------------------------
def channel_dir(state_dir: Path) -> Path:
    return Path(state_dir) / DIR_NAME


def prepare_dir(folder: Path) -> Path:
    """The channel's folder: created 0700, and made 0700 if it was not; it must be this user's."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise UserError(f"cannot use {folder} for the trainer's socket: not a folder of this user")
        if stat.S_IMODE(info.st_mode) != 0o700:
            folder.chmod(0o700)
    except OSError as exc:
        raise UserError(f"cannot create the trainer's socket folder {folder}: {exc.strerror or exc}") from None
    return folder


def new_secret(folder: Path) -> bytes:
    """A fresh secret in ``folder/secret``, 0600 from the moment it exists."""
    secret = secrets.token_bytes(SECRET_BYTES)
    tmp = folder / f".{SECRET_NAME}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(folder / SECRET_NAME)
    return secret


def read_secret(folder: Path) -> bytes:
    try:
        secret = (folder / SECRET_NAME).read_bytes()
    except OSError as exc:
        raise ChannelError(f"cannot read the agent's secret in {folder}: {exc.strerror or exc}") from None
    if len(secret) != SECRET_BYTES:
        raise ChannelError(f"the agent's secret in {folder} is malformed")
    return secret


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """``path`` as a socket address; a long one through its folder's descriptor (Linux)."""
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def listen(folder: Path) -> socket.socket:
    """The trainer's socket, 0600 from the moment it exists; a stale one (a trainer that
    died) is replaced: the agent's lock allows one agent, so one trainer, per state folder."""
    path = folder / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        path.unlink(missing_ok=True)
        with _address(path) as address:
            sock.bind(address)
        path.chmod(0o600)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot open the trainer's socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def connect(folder: Path, wait_s: float) -> socket.socket:
    """Connect to the trainer, waiting up to ``wait_s`` for one that is (re)starting."""
    path = folder / SOCKET_NAME
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(AUTH_TIMEOUT_S)
        try:
            with _address(path) as address:
                sock.connect(address)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise ChannelError(f"no trainer is listening on {path}: {exc.strerror}") from None
            time.sleep(0.2)
        except OSError as exc:
            sock.close()
            raise ChannelError(f"cannot connect to the trainer on {path}: {exc.strerror or exc}") from None


# ----- frames ----------------------------------------------------------------------------
def send_frame(sock: socket.socket, data: bytes) -> None:
    if len(data) <= 1 << 16:  # one write: the peer may close as soon as it has read the last frame
        sock.sendall(LENGTH.pack(len(data)) + data)
        return
    sock.sendall(LENGTH.pack(len(data)))
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if k == 0:
            where = "in the middle of" if got else "before"
            raise ChannelError(f"the connection closed {where} the {what}")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int, what: str) -> bytes:
    """One frame of at most ``limit`` bytes; a longer one is refused before it is read."""
    (size,) = LENGTH.unpack(_recv_exact(sock, LENGTH.size, what))
    if size > limit:
        raise ChannelError(f"the {what} is {size} bytes, over its limit of {limit}")
    return _recv_exact(sock, size, what)


def send_json(sock: socket.socket, value: dict) -> None:
    send_frame(sock, json.dumps(value).encode())


def recv_json(sock: socket.socket, what: str = "header") -> dict:
    raw = recv_frame(sock, HEADER_LIMIT, what)
    try:
        value = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise ChannelError(f"malformed {what}: not JSON") from None
    if not isinstance(value, dict):
        raise ChannelError(f"malformed {what}: not a JSON object")
    return value


# ----- the relay's side --------------------------------------------------------------------
def request(
    folder: Path, op: str, frames: Sequence[bytes], reply_limits: Sequence[int], wait_s: float = 60.0
) -> list[bytes]:
    """Send one request to the trainer in ``folder``; its reply frames, each within its limit.
    Raises ``Busy`` when the trainer is serving another request, else ``ChannelError``."""
    secret = read_secret(folder)
    sock = connect(folder, wait_s)
    try:
        with sock:
            try:
                send_frame(sock, secret)
                send_json(sock, {"v": VERSION, "op": op, "frames": len(frames)})
                _expect(recv_json(sock, "trainer's answer"), "ready")
            except (ConnectionResetError, BrokenPipeError):
                raise ChannelError("the trainer closed the connection unanswered (not this agent's secret?)") from None
            sock.settimeout(IO_TIMEOUT_S)
            try:
                for frame in frames:
                    send_frame(sock, frame)
            except OSError:  # the trainer stopped reading: it may have said why
                _expect(recv_json(sock, "trainer's answer"), "ok")
                raise
            sock.settimeout(None)  # training takes as long as it takes; a dead trainer closes the socket
            answer = recv_json(sock, "trainer's reply")
            _expect(answer, "ok")
            if answer.get("frames") != len(reply_limits):
                raise ChannelError(f"the trainer's reply has {answer.get('frames')!r} frames, not {len(reply_limits)}")
            sock.settimeout(IO_TIMEOUT_S)
            return [recv_frame(sock, limit, f"reply frame {i}") for i, limit in enumerate(reply_limits)]
    except OSError as exc:
        raise ChannelError(f"the connection to the trainer broke: {exc.strerror or exc}") from None


def _expect(answer: dict, status: str) -> None:
    got = answer.get("status")
    if got == status:
        return
    if got == "busy":
        raise Busy("the trainer is busy with another request")
    raise ChannelError(f"the trainer refused the request: {one_line(str(answer.get('reason', got)))}")


# ----- the trainer's side ------------------------------------------------------------------
class Server:
    """Serves one request at a time on ``sock`` with ``handler(header, frames) -> frames``.

    ``ops`` maps each accepted operation to its number of request frames; each request
    frame is at most ``max_frame_bytes``."""

    def __init__(self, sock: socket.socket, secret: bytes, handler: Handler, ops: dict[str, int], max_frame_bytes: int):
        self.sock, self.secret, self.handler = sock, secret, handler
        self.ops, self.max_frame_bytes = dict(ops), max_frame_bytes
        self._busy = threading.Lock()

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: socket.socket) -> None:
        """One connection: authenticate, then one request."""
        with conn:
            conn.settimeout(AUTH_TIMEOUT_S)
            try:
                if not hmac.compare_digest(recv_frame(conn, SECRET_BYTES, "secret"), self.secret):
                    return  # foreign: closed without a word
                header = recv_json(conn)
            except (ChannelError, OSError):
                return
            try:
                self._serve(conn, header)
            except (ChannelError, OSError) as exc:
                log.warning("trainer: request dropped: %s", one_line(str(exc)))
                with contextlib.suppress(OSError):
                    send_json(conn, {"status": "error", "reason": one_line(str(exc))})

    def _serve(self, conn: socket.socket, header: dict) -> None:
        op = header.get("op")
        if header.get("v") != VERSION or op not in self.ops or header.get("frames") != self.ops[op]:
            raise ChannelError(f"malformed request header (version {header.get('v')!r}, op {str(op)[:40]!r})")
        if not self._busy.acquire(blocking=False):
            send_json(conn, {"status": "busy"})
            return
        try:
            send_json(conn, {"status": "ready"})
            conn.settimeout(IO_TIMEOUT_S)
            frames = [recv_frame(conn, self.max_frame_bytes, f"request frame {i}") for i in range(self.ops[op])]
            try:
                reply = self.handler(header, frames)
            except Exception as exc:  # the relay declines; the story stays in this log
                log.exception("trainer: the request failed")
                raise ChannelError(f"the request failed ({type(exc).__name__})") from None
            send_json(conn, {"status": "ok", "frames": len(reply)})
            for frame in reply:
                send_frame(conn, frame)
        finally:
            self._busy.release()
