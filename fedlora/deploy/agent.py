"""``fedlora client``: a client agent, i.e. Flower's SuperNode with this machine's settings.

The node config carries the data path, its size and the digest of its parsed rows, rank,
device, the agent's own task (columns, declared label set), privacy settings and state
folder; the ClientApp's handler (``fedlora.client.handler``) reads them and only this
machine's file. It runs in the agent's resident trainer
(``fedlora.deploy.trainer``), which keeps the model and data loaded between messages; the
ClientApp that the SuperNode starts per message only relays to it. Only fedlora's own
ClientApp runs (``fedlora.deploy.trusted_app``), one agent per state folder (a lock). The
agent serves the coordinator's runs until stopped.

Only the agent answers for the agent: the state folder is its user's alone (0700); its
SuperNode's runtime API is a Unix socket in it (``api/supernode.sock``, 0600), no loopback
TCP port; task tokens reach the ClientApp in private files, and the node config in one
(``node-config.toml``, 0600), never on a command line every user of the machine can read.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import threading
from collections import deque
from pathlib import Path

from fedlora.deploy.processes import (
    child_env,
    flower_executable,
    parse_address,
    start,
    stop,
    terminate_on_sigterm,
)
from fedlora.deploy.trainer import ResidentTrainer
from fedlora.deploy.trusted_app import write_launcher
from fedlora.errors import UserError
from fedlora.io.agent_state import AgentPrivacy, Ledger, default_state_dir, lock_state_dir, private_dir, rows_digest
from fedlora.io.agent_task import AgentTask
from fedlora.ml.progress import PROGRESS_ENV
from fedlora.ml.quantize import require_quantization

DEVICES = ("auto", "cuda", "cpu")
API_SOCKET = "api/supernode.sock"  # under the state folder: the SuperNode's runtime API
NODE_CONFIG = "node-config.toml"  # under the state folder: the node config, off the command line
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
    task: AgentTask = AgentTask(),
) -> str:
    """Flower's ``--node-config``: ``key=value`` pairs, strings as TOML literal strings
    (Flower's parser allows any character in them but the quote itself)."""
    for path in (data, state_dir):
        if "'" in str(path):
            raise UserError(f"paths with a ' cannot be passed to Flower's node config: {path}")
    pairs = [f"data-path='{data}'", f"state-dir='{state_dir}'", f"num-examples={int(num_examples)}", *own.node_config()]
    pairs.append(task.node_config())
    if digest:
        pairs.append(f"data-digest='{digest}'")
    if rank is not None:
        pairs.append(f"rank={int(rank)}")
    if quantize != "none":
        pairs.append(f"quantize='{quantize}'")
    pairs.append(f"device='{device}'")  # last: Flower reads a value ending in .toml as a file name
    return " ".join(pairs)


def own_state_dir(state: Path) -> Path:
    """The agent's state folder, its user's alone: made 0700, or narrowed to 0700 (with a line
    saying so); a folder of another user's, or something other than a folder, is refused."""
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = state.stat()
    except OSError as exc:
        raise UserError(f"cannot use the state folder {state}: {exc.strerror or exc}") from None
    if info.st_uid != os.getuid():
        raise UserError(f"the state folder {state} belongs to another user: give the agent a folder of its own")
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        state.chmod(0o700)
        print(f"fedlora client: the state folder {state} was {mode:04o}: now 0700, its user's alone", flush=True)
    return state


def private_node_config(config: str, path: Path) -> Path:
    """``config`` (``node_config``'s pairs) as the TOML file Flower's ``--node-config`` also
    takes, 0600: the agent's settings stay off its command line, which every user sees. Split
    into pairs with the pattern Flower's parser uses, so both read the same."""
    from flwr.common.config import parse_config_args  # lazy: Flower, as the agent starts

    pattern = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # flwr.common.config.parse_config_args
    text = "".join(f"{key} = {value}\n" for key, value in pattern.findall(config))
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(text)
    if parse_config_args([str(path)]) != parse_config_args([config]):
        raise UserError("the node config does not read the same from a file")  # a change in Flower's parser
    return path


def check_agent(
    coordinator: str,
    data: str,
    rank: int | None,
    device: str,
    dp_epsilon: float | None,
    root_cert: str | None,
    insecure: bool,
    auth_key: str | None,
    task: AgentTask = AgentTask(),
) -> tuple[AgentTask, int, str]:
    """Fail here, before anything connects, on settings the agent could not train with;
    returns the task with its declared label set, the number of examples in ``data`` and
    the digest of its parsed rows (the key of its privacy ledger)."""
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
    task.check()
    local = task.load(data)
    task = task.declared(local.label_names)
    if task.task == "causal-lm":
        print(f"fedlora client: {len(local)} prompt/response pairs", flush=True)
    else:
        print(f"fedlora client: {len(local)} examples, declared labels {list(task.labels)}", flush=True)
    return task, len(local), rows_digest(local.rows())


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
    task: AgentTask = AgentTask(),
    max_wait_s: float | None = None,
    dp_reset: bool = False,
    quantize: str = "none",
) -> int:
    own.check()
    task, num_examples, digest = check_agent(
        coordinator, data, rank, device, own.epsilon, root_cert, insecure, auth_key, task
    )
    require_quantization(quantize, device)
    state = own_state_dir(Path(state_dir).resolve() if state_dir else default_state_dir())
    lock = lock_state_dir(state)  # held until this process exits: one agent per state folder
    if dp_reset and Ledger(state, digest).reset():
        print(f"fedlora client: privacy ledger of {data} reset: its spent budget is forgotten", flush=True)
    print(f"fedlora client: state in {state}", flush=True)
    private_dir(state / "flower")
    flower_executable("flower-supernode")  # flwr installed here: else a clear error now
    cmd = [sys.executable, "-m", "fedlora.deploy.supernode", "--poll-s", str(SUPERNODE_POLL_S)]
    # the SuperNode's runtime API, for its SuperExec and ClientApp processes: a socket only
    # this user can open, not a loopback TCP port
    cmd += ["--api-socket", str(state / API_SOCKET)]
    cmd += ["--superlink", coordinator]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(Path(root_cert).resolve())]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    config = node_config(Path(data).resolve(), rank, device, own, state, num_examples, digest, quantize, task)
    cmd += ["--node-config", str(private_node_config(config, state / NODE_CONFIG))]
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
    # the SuperNode starts `flower-superexec`, and that `flwr-clientapp`, by name: ours first,
    # which reach it through its socket (task tokens in private files) and run fedlora's
    # ClientApp only, as a relay to the resident trainer
    launchers = write_launcher(state / "bin", relay=True, api_socket=state / API_SOCKET)
    env["PATH"] = f"{launchers}{os.pathsep}{env['PATH']}"
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
