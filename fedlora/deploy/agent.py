"""``fedlora client``: a client agent, i.e. Flower's SuperNode with this machine's settings.

The node config carries the data path, its size and digest, rank, device, the agent's own
privacy settings and state folder; the ClientApp's handler (``fedlora.client.handler``) reads them
and only this machine's file. It runs in the agent's resident trainer
(``fedlora.deploy.trainer``), which keeps the model and data loaded between messages; the
ClientApp that the SuperNode starts per message only relays to it. Only fedlora's own
ClientApp runs (``fedlora.deploy.trusted_app``), one agent per state folder (a lock). The
agent serves the coordinator's runs until stopped.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import deque
from pathlib import Path

from fedlora.deploy.processes import (
    child_env,
    flower_executable,
    free_loopback_port,
    parse_address,
    start,
    stop,
    terminate_on_sigterm,
)
from fedlora.deploy.trainer import ResidentTrainer
from fedlora.deploy.trusted_app import write_launcher
from fedlora.errors import UserError
from fedlora.io.agent_state import AgentPrivacy, Ledger, data_digest, default_state_dir, lock_state_dir, private_dir
from fedlora.ml.data import load_text_file
from fedlora.ml.instructions import load_instruction_file
from fedlora.ml.progress import PROGRESS_ENV
from fedlora.ml.quantize import require_quantization

DEVICES = ("auto", "cuda", "cpu")
SUPERNODE_POLL_S = 0.2  # an agent that has just replied asks for work this soon (Flower: 3 s; see deploy.supernode)
TASK_POLL_S = "0.2"  # how often the SuperNode's executor looks for a message to start a ClientApp for (Flower: 1 s)


def node_config(
    data: Path,
    rank: int | None,
    device: str,
    own: AgentPrivacy,
    state_dir: Path,
    num_examples: int = 0,
    digest: str = "",
    quantize: str = "none",
) -> str:
    """Flower's ``--node-config``: ``key=value`` pairs, strings as TOML literal strings
    (Flower's parser allows any character in them but the quote itself)."""
    for path in (data, state_dir):
        if "'" in str(path):
            raise UserError(f"paths with a ' cannot be passed to Flower's node config: {path}")
    pairs = [f"data-path='{data}'", f"state-dir='{state_dir}'", f"num-examples={int(num_examples)}", *own.node_config()]
    if digest:
        pairs.append(f"data-digest='{digest}'")
    if rank is not None:
        pairs.append(f"rank={int(rank)}")
    if quantize != "none":
        pairs.append(f"quantize='{quantize}'")
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
) -> int:
    """Fail here, before anything connects, on settings the agent could not train with;
    returns the number of examples in ``data``."""
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
        import torch  # lazy: torch for --device cuda only

        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine")
    if task == "causal-lm":
        pairs = load_instruction_file(data)
        print(f"fedlora client: {len(pairs)} prompt/response pairs", flush=True)
        return len(pairs)
    if task == "classify":
        local = load_text_file(data, text_column, label_column)
        print(f"fedlora client: {len(local)} examples, labels {local.label_names}", flush=True)
        return len(local)
    raise UserError(f"unknown task {task!r}: choose classify or causal-lm")


def run_agent(
    coordinator: str,
    data: str,
    rank: int | None = None,
    device: str = "auto",
    own: AgentPrivacy = AgentPrivacy(),
    root_cert: str | None = None,
    insecure: bool = False,
    auth_key: str | None = None,
    state_dir: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    task: str = "classify",
    max_wait_s: float | None = None,
    dp_reset: bool = False,
    quantize: str = "none",
) -> int:
    own.check()
    num_examples = check_agent(
        coordinator, data, rank, device, own.epsilon, root_cert, insecure, auth_key, text_column, label_column, task
    )
    require_quantization(quantize, device)
    state = Path(state_dir).resolve() if state_dir else default_state_dir()
    lock = lock_state_dir(state)  # held until this process exits: one agent per state folder
    digest = data_digest(data)
    if dp_reset and Ledger(state, digest).reset():
        print(f"fedlora client: privacy ledger of {data} reset: its spent budget is forgotten", flush=True)
    print(f"fedlora client: state in {state}", flush=True)
    private_dir(state / "flower")
    flower_executable("flower-supernode")  # flwr installed here: else a clear error now
    cmd = [sys.executable, "-m", "fedlora.deploy.supernode", "--poll-s", str(SUPERNODE_POLL_S)]
    cmd += ["--superlink", coordinator]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(Path(root_cert).resolve())]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    # the SuperNode's own API for its ClientApp processes: loopback, a free port
    cmd += ["--host", "127.0.0.1", "--port", str(free_loopback_port())]
    config = node_config(Path(data).resolve(), rank, device, own, state, num_examples, digest, quantize)
    cmd += ["--node-config", config]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    terminate_on_sigterm()
    try:
        code, problems = _serve(cmd, state)
    finally:
        lock.close()
    if code != 0:
        raise UserError(f"the agent stopped (SuperNode exit status {code}): {_reason(problems)}")
    return 0


def _serve(supernode: list[str], state: Path) -> tuple[int, deque[str]]:
    """The resident trainer, then the SuperNode, until the SuperNode exits; the trainer
    is restarted whenever it dies, and stopped with the SuperNode."""
    env = child_env(state / "flower")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_S)  # local only: its own SuperNode
    # the trainer writes into a pipe the agent echoes: its bars show where the agent's output does
    env.setdefault(PROGRESS_ENV, "1" if sys.stdout.isatty() else "0")
    # the SuperNode starts `flwr-clientapp` by name: ours first, which runs fedlora's ClientApp
    # only, as a relay to the resident trainer
    env["PATH"] = f"{write_launcher(state / 'bin', relay=True)}{os.pathsep}{env['PATH']}"
    trainer = ResidentTrainer(state, env)
    problems: deque[str] = deque(maxlen=20)  # an agent may run for weeks of retry warnings
    try:
        trainer.start()
        node = start(supernode, env, None)
        # the SuperNode's children inherit its output pipe: read it on the side and wait for
        # the SuperNode itself, whose exit is what counts
        pump = threading.Thread(target=_echo, args=(node.stdout, problems), daemon=True)
        pump.start()
        try:
            code = node.wait()
        finally:
            stop(node)
            pump.join(timeout=5)
    finally:
        trainer.stop()
    return code, problems


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
    (
        "[code: 2004]",
        "the coordinator refused this client's key: is its public key registered there? "
        "(After a restart, also wait until the coordinator has marked the old agent offline, about a minute.)",
    ),
    ("[code: 2001]", "the coordinator requires node authentication: pass --auth-key"),
    ("refused the coordinator's app bundle", "the coordinator sent an app bundle other than fedlora's own: refused"),
    ("Giving up", "the coordinator could not be reached"),
)


def _reason(problems: deque[str]) -> str:
    """What the SuperNode's log says went wrong, in one line."""
    text = [ANSI.sub("", p).strip() for p in problems]
    for needle, reason in KNOWN_REFUSALS:
        if any(needle in line for line in text):
            return reason
    return text[-1] if text else "see the log above"
