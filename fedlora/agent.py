"""``fedlora client``: a client agent, i.e. Flower's SuperNode with this machine's settings.

The node config carries the data path, rank, device, privacy budget and state folder; the
ClientApp (``fedlora.client.app``) reads them and only this machine's file. The agent
serves the coordinator's runs until stopped.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import deque
from pathlib import Path

from fedlora.coordinator import parse_address
from fedlora.data import load_text_file
from fedlora.instructions import load_instruction_file
from fedlora.errors import UserError
from fedlora.processes import child_env, flower_executable, free_loopback_port, start, stop, terminate_on_sigterm

DEVICES = ("auto", "cuda", "cpu")


def node_config(data: Path, rank: int | None, device: str, dp_epsilon: float | None, state_dir: Path) -> str:
    """Flower's ``--node-config``: ``key=value`` pairs, strings as TOML literal strings
    (Flower's parser allows any character in them but the quote itself)."""
    for path in (data, state_dir):
        if "'" in str(path):
            raise UserError(f"paths with a ' cannot be passed to Flower's node config: {path}")
    pairs = [f"data-path='{data}'", f"state-dir='{state_dir}'"]
    if rank is not None:
        pairs.append(f"rank={int(rank)}")
    if dp_epsilon is not None:
        pairs.append(f"dp-epsilon={float(dp_epsilon)!r}")
    pairs.append(f"device='{device}'")  # last: Flower reads a value ending in .toml as a file name
    return " ".join(pairs)


def check_agent(
    coordinator: str,
    data: str,
    rank: int | None,
    device: str,
    dp_epsilon: float | None,
    root_cert: str | None,
    insecure: bool,
    auth_key: str | None,
    text_column: str,
    label_column: str,
    task: str = "classify",
) -> None:
    """Fail here, before anything connects, on settings the agent could not train with."""
    parse_address(coordinator)
    if (root_cert is None) == (not insecure):
        raise UserError("choose one of --root-cert FILE (TLS) or --insecure")
    if root_cert is not None and not Path(root_cert).is_file():
        raise UserError(f"--root-cert: no such file {root_cert}")
    if auth_key is not None:
        if insecure:
            raise UserError("--auth-key needs TLS: Flower authenticates nodes only over encrypted connections")
        if not Path(auth_key).is_file():
            raise UserError(f"--auth-key: no such file {auth_key}")
    if rank is not None and rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    if dp_epsilon is not None and not dp_epsilon > 0:
        raise UserError(f"dp-epsilon must be > 0, got {dp_epsilon}")
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: choose auto, cuda or cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine")
    if task == "causal-lm":
        pairs = load_instruction_file(data)
        print(f"fedlora client: {len(pairs)} prompt/response pairs", flush=True)
    elif task == "classify":
        local = load_text_file(data, text_column, label_column)
        print(f"fedlora client: {len(local)} examples, labels {local.label_names}", flush=True)
    else:
        raise UserError(f"unknown task {task!r}: choose classify or causal-lm")


def run_agent(
    coordinator: str,
    data: str,
    rank: int | None = None,
    device: str = "auto",
    dp_epsilon: float | None = None,
    root_cert: str | None = None,
    insecure: bool = False,
    auth_key: str | None = None,
    state_dir: str = "fedlora-client",
    text_column: str = "text",
    label_column: str = "label",
    task: str = "classify",
    max_wait_s: float | None = None,
) -> int:
    check_agent(coordinator, data, rank, device, dp_epsilon, root_cert, insecure, auth_key, text_column, label_column, task)
    state = Path(state_dir).resolve()
    (state / "flower").mkdir(parents=True, exist_ok=True)
    cmd = [flower_executable("flower-supernode"), "--superlink", coordinator]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(Path(root_cert).resolve())]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    # the SuperNode's own API for its ClientApp processes: loopback, a free port
    cmd += ["--host", "127.0.0.1", "--port", str(free_loopback_port())]
    cmd += ["--node-config", node_config(Path(data).resolve(), rank, device, dp_epsilon, state)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    terminate_on_sigterm()
    node = start(cmd, child_env(state / "flower"), None)
    problems: deque[str] = deque(maxlen=20)  # an agent may run for weeks of retry warnings
    # the SuperNode's children inherit its output pipe: read it on the side and wait for
    # the SuperNode itself, whose exit is what counts
    pump = threading.Thread(target=_echo, args=(node.stdout, problems), daemon=True)
    pump.start()
    try:
        code = node.wait()
    finally:
        stop(node)
        pump.join(timeout=5)
    if code != 0:
        raise UserError(f"the agent stopped (SuperNode exit status {code}): {_reason(problems)}")
    return 0


def _echo(stream, problems: deque[str]) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if any(word in line for word in ("rror", "refused", "Failed", "Giving up", "failed", "[code:")):
            problems.append(line.strip())


ANSI = re.compile(r"\x1b\[[0-9;]*m")
KNOWN_REFUSALS = (
    ("handshake", "TLS handshake with the coordinator failed: is --root-cert the CA that signed its certificate?"),
    ("[code: 2004]", "the coordinator refused this client's key: is its public key registered there?"),
    ("[code: 2001]", "the coordinator requires node authentication: pass --auth-key"),
    ("Giving up", "the coordinator could not be reached"),
)


def _reason(problems: deque[str]) -> str:
    """What the SuperNode's log says went wrong, in one line."""
    text = [ANSI.sub("", p).strip() for p in problems]
    for needle, reason in KNOWN_REFUSALS:
        if any(needle in line for line in text):
            return reason
    return text[-1] if text else "see the log above"
