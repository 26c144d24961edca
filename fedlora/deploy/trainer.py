"""A deployed agent's resident trainer, and the agent's side that keeps it running.

    python -m fedlora.deploy.trainer --state-dir DIR [--max-request-mb N]

Flower 1.39 starts a fresh ClientApp process for every message; loading torch, the base
model, the tokenizer and the data in each cost more than the training itself. So
``fedlora client`` starts this one long-lived process (under ``fedlora.deploy.guard``, so
it dies with the agent) before its SuperNode, and the ClientApp that Flower starts per
message is a relay (``fedlora.client.relay``) that hands the message to it over the
agent's local channel (``fedlora.io.channel``). The trainer answers with the ClientApp's
own handler, ``fedlora.client.handler.train``: the per-process caches of ``fedlora.ml.task``
keep the model and data loaded between messages, while adapters, optimiser and DP state
are set up per message exactly as in a fresh process.

It serves one request at a time. A trainer that cannot start says why in one line on
stderr and exits with status 2; one that dies is started again by the agent
(``ResidentTrainer``), and the message it was serving is declined by the relay.
"""

from __future__ import annotations

import argparse
import codecs
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from fedlora.deploy.processes import disarm_sigterm, start, stop, terminate_on_sigterm
from fedlora.errors import UserError
from fedlora.io.channel import (
    SOCKET_NAME,
    ChannelError,
    Handler,
    Server,
    channel_dir,
    listen,
    new_secret,
    prepare_dir,
    read_secret,
)
from fedlora.untrusted import one_line

READY = "fedlora trainer: ready"
DEFAULT_MAX_REQUEST_MB = 2048  # a download: the global state and what a client holds, with room to spare
STARTUP_TIMEOUT_S = 600.0
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 15.0, 60.0)  # longer each time a trainer dies again soon
STEADY_S = 120.0  # a trainer that lived this long resets the delay


# ----- the trainer process -----------------------------------------------------------------
def load_handler() -> Handler:
    """The ClientApp's own handler, behind the channel's request and reply frames."""
    from fedlora.client.handler import train  # lazy: torch and transformers, for the trainer process alone
    from fedlora.client.relay import decode_request, encode_reply  # lazy: Flower, for the trainer process alone

    def handle(header: dict, frames: list[bytes]) -> list[bytes]:
        msg, context = decode_request(frames)
        reply = train(msg, context)
        return encode_reply(reply, context)

    return handle


def open_server(state_dir: Path, max_request_mb: int) -> Server:
    """Everything that can fail at start, before the trainer says it is ready."""
    from fedlora.client.relay import OP_TRAIN, REQUEST_FRAMES  # lazy: Flower, for the trainer process alone

    if not state_dir.is_dir():
        raise UserError(f"no such state folder {state_dir}")
    if max_request_mb < 1:
        raise UserError(f"--max-request-mb must be >= 1, got {max_request_mb}")
    folder = prepare_dir(channel_dir(state_dir))
    try:
        secret = read_secret(folder)
    except ChannelError as exc:
        raise UserError(str(exc)) from None
    handler = load_handler()
    return Server(listen(folder), secret, handler, {OP_TRAIN: REQUEST_FRAMES}, max_request_mb * 1024 * 1024)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.deploy.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, help="the agent's state folder")
    parser.add_argument("--max-request-mb", type=int, default=DEFAULT_MAX_REQUEST_MB)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported; a user may opt in
    state_dir = Path(args.state_dir).resolve()
    try:
        server = open_server(state_dir, args.max_request_mb)
    except (UserError, OSError, ImportError) as exc:
        print(f"fedlora trainer: {one_line(str(exc), 300)}", file=sys.stderr, flush=True)
        return 2
    terminate_on_sigterm()
    print(f"{READY} on {channel_dir(state_dir) / SOCKET_NAME}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.sock.close()
        (channel_dir(state_dir) / SOCKET_NAME).unlink(missing_ok=True)
        disarm_sigterm()  # a SIGTERM now (its guard's) would land in atexit callbacks
    return 0


# ----- the agent's side ----------------------------------------------------------------------
class ResidentTrainer:
    """Starts the trainer under the guard, waits until it serves, and starts it again
    whenever it dies, until ``stop``. A trainer that cannot start at all is a UserError."""

    def __init__(self, state_dir: Path, env: dict[str, str], startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.state_dir, self.env, self.startup_timeout_s = state_dir, env, startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedlora.deploy.trainer", "--state-dir", str(self.state_dir)]

    def start(self) -> None:
        try:
            new_secret(prepare_dir(channel_dir(self.state_dir)))  # this agent's, for as long as it runs
        except OSError as exc:
            raise UserError(f"cannot write the trainer's secret: {exc.strerror or exc}") from None
        self._launch_and_wait()
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None:
            stop(proc)

    def _launch_and_wait(self) -> None:
        proc = start(self.command(), self.env, None)
        with self._lock:
            if self._stopping.is_set():
                stop(proc)
                return
            self.proc = proc
        ready, lines = threading.Event(), deque(maxlen=20)
        threading.Thread(target=_echo, args=(proc.stdout, ready, lines), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.wait(0.2):
            if proc.poll() is not None:
                if self._stopping.is_set():
                    return
                time.sleep(0.2)  # the last words may still be in the pipe
                raise UserError(f"the trainer could not start: {_last_words(lines)}")
            if time.monotonic() > deadline:
                stop(proc)
                raise UserError(f"the trainer did not start within {self.startup_timeout_s:.0f} s")

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            proc, started = self.proc, time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started > STEADY_S else failures + 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            print(f"fedlora client: the trainer stopped (exit status {code}); starting it again", flush=True)
            if self._stopping.wait(delay):
                return
            try:
                self._launch_and_wait()
                self.restarts += 1
            except UserError as exc:
                print(f"fedlora client: {exc}", flush=True)


def _echo(stream, ready: threading.Event, lines: deque[str]) -> None:
    """The trainer's output, on the agent's, as it comes: a progress bar redraws its line
    with carriage returns, not newlines. Notes when the trainer is ready."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := stream.read1(65536):
        text = decoder.decode(chunk)
        sys.stdout.write(text)
        sys.stdout.flush()
        *complete, pending = (pending + text).split("\n")
        for line in complete:
            line = line.rsplit("\r", 1)[-1].rstrip()  # what is left on the line once a bar has drawn over it
            lines.append(line)
            if line.startswith(READY):
                ready.set()
    if pending.strip():
        lines.append(pending.rsplit("\r", 1)[-1].rstrip())


def _last_words(lines: deque[str]) -> str:
    said = [line.removeprefix("fedlora trainer: ").strip() for line in lines if line.strip()]
    return said[-1] if said else "it exited without a word"


if __name__ == "__main__":
    sys.exit(main())
