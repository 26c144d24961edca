"""``fedlora coordinator``: Flower's SuperLink and one federated run, supervised as a group.

The SuperLink serves client agents on ``--address`` (gRPC, TLS unless ``--insecure``) and
its local API (control and runtime) on a Unix socket in ``OUT/.flower`` (0700), which only
the operator can open (``fedlora.deploy.local_api``); it runs no ServerApp but fedlora's own
(``fedlora.deploy.trusted_server``). The run is the same ServerApp as the simulation
(``fedlora.server.app:app``), submitted as a Flower app whose run config carries the
fedlora settings, less the coordinator's own (where it reports to, its paths), which its
ServerApp reads from a private file. Everything Flower keeps goes under ``OUT/.flower``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.config.server_settings import SERVED_FOLDER_ENV, write_server_settings
from fedlora.deploy.local_api import (
    NOMINAL_ADDRESS,
    NOMINAL_PORT,
    SOCKET_NAME,
    TOKEN_DIR,
    private_folder,
    wait_for_socket,
    write_launchers,
)
from fedlora.deploy.processes import (
    child_env,
    flower_executable,
    free_loopback_port,
    last_line,
    parse_address,
    runs_flower_app,
    start,
    stop,
    terminate_on_sigterm,
)
from fedlora.deploy.trusted_app import TRUSTED_CLIENTAPP
from fedlora.errors import UserError
from fedlora.io.report import write_json_atomic
from fedlora.quiet import verbose

APP_PYPROJECT = """\
[project]
name = "fedlora-run"
version = "1.0.0"
description = "a fedlora federated run (the code is the installed fedlora package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.server.app:app"
clientapp = "fedlora.client.app:app"

[tool.flwr.app.config]
fedlora-config = "{}"
out-dir = ""
resume = false
log-name = ""
hold-until = ""
"""
ATTACK_CLIENTAPP = "fedlora.flower.attacks:app"  # simulation only
TLS_FILES = ("ca.crt", "server.pem", "server.key")
REGISTERED_KEYS = "registered-keys.json"  # under .flower: the node id of each key this run registered
SECURITY_RECORD = "deployment.json"  # the run's TLS and node-authentication mode
POLL_S = 0.5  # reading the progress log; Flower is asked only every STATUS_EVERY_S
STATUS_EVERY_S = 15.0
FINISHED = "run finished"  # the ServerApp's last progress line
LOG_NAME = "coordinator.log"  # the run's progress, in the run folder


def superlink_message_cap(max_update_mb: int) -> int:
    """The largest gRPC message the SuperLink takes from or sends to an agent: an update
    within ``--max-update-mb``, or a download of about the same tensors (FLoRA's catch-up
    is bounded too), with room to spare."""
    return 2 * max_update_mb * 1024 * 1024


# A reply's object tree: a fedlora reply (or decline) is 4 objects (the message, its
# records, the payload, the metrics); a ClientApp error is 1. Its bytes in all are bounded
# by the message cap.
MAX_REPLY_OBJECTS = 16


@dataclass
class Deployment:
    address: str  # HOST:PORT the client agents connect to
    tls_dir: Path | None  # None: --insecure
    auth_keys: list[Path]
    startup_timeout_s: float = 60.0


def check_deployment(address: str, tls_dir: str | None, insecure: bool, auth_keys: str | None) -> Deployment:
    parse_address(address)
    if (tls_dir is None) == (not insecure):
        raise UserError("choose one of --tls-dir DIR (TLS) or --insecure")
    tls = None
    if tls_dir is not None:
        tls = Path(tls_dir).resolve()
        missing = [name for name in TLS_FILES if not (tls / name).is_file()]
        if missing:
            raise UserError(f"--tls-dir {tls_dir} lacks {', '.join(missing)} (fedlora certs writes them)")
    keys: list[Path] = []
    if auth_keys is not None:
        if tls is None:
            raise UserError("--auth-keys needs TLS: Flower authenticates nodes only over encrypted connections")
        folder = Path(auth_keys)
        if not folder.is_dir():
            raise UserError(f"--auth-keys: no such folder {auth_keys}")
        keys = sorted(p.resolve() for p in folder.glob("*.pub"))
        if not keys:
            raise UserError(f"--auth-keys {auth_keys} holds no *.pub public keys")
    return Deployment(address, tls, keys)


class _Flower:
    """The ``flwr`` command line, talking to our SuperLink's control API through its socket
    (``exe``: the launcher in the run's ``.flower/bin``)."""

    def __init__(self, home: Path, exe: Path, tls_dir: Path | None):
        home.mkdir(parents=True, exist_ok=True)
        conn = "insecure = true" if tls_dir is None else f"root-certificates = {json.dumps(str(tls_dir / 'ca.crt'))}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{NOMINAL_ADDRESS}"\n{conn}\n'
        )
        self.env = child_env(home)
        self.exe = str(exe)

    def call(self, *args: str) -> dict:
        return self.start(*args).result()

    def start(self, *args: str) -> _FlowerCall:
        """``flwr ARGS`` started, not waited for."""
        cmd = [self.exe, *args, "--format", "json"]
        return _FlowerCall(
            subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )


@dataclass
class _FlowerCall:
    proc: subprocess.Popen

    def result(self) -> dict:
        """Its JSON answer; UserError with Flower's reason when it failed."""
        text, err = self.proc.communicate()
        args = self.proc.args[1:3]
        try:
            result = json.loads(text[text.index("{") :])
        except ValueError:
            result = {}
        if self.proc.returncode != 0 or not result.get("success", True):
            # Flower's error comes last, after any warnings of its own
            detail = [line.strip() for line in str(result.get("error-message") or err or text).splitlines()]
            raise UserError(f"flwr {' '.join(args)}: {([d for d in detail if d] or ['no output'])[-1]}")
        return result

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate()


def key_fingerprint(path: Path) -> str:
    """An OpenSSH public key's identity: its type and key material, not its comment."""
    fields = path.read_text().split()
    if len(fields) < 2:
        raise UserError(f"{path} is not an OpenSSH public key")
    return hashlib.sha256(" ".join(fields[:2]).encode()).hexdigest()


LIVE_NODE = ("registered", "online", "offline")  # a node Flower would still let in (unregistered: never again)


def sync_registered_keys(cli: _Flower, keys: list[Path], registry_path: Path) -> None:
    """Make the SuperLink's registered keys exactly ``keys``: register the new ones and
    unregister every other node the SuperLink knows (its database keeps them across a
    restart), whether this run registered it or not. ``registry_path`` maps each key we
    registered to its node id: Flower lists nodes without their keys."""
    registry: dict[str, int] = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    wanted = {key_fingerprint(k): k for k in keys}
    try:
        for fingerprint in [f for f in registry if f not in wanted]:
            del registry[fingerprint]  # unregistered below, with any node this run has no record of
        kept = set(registry.values())
        for node in cli.call("supernode", "list").get("nodes", []):
            if node.get("status") in LIVE_NODE and int(node["node-id"]) not in kept:
                cli.call("supernode", "unregister", str(node["node-id"]))
        for fingerprint, key in wanted.items():
            if fingerprint in registry:
                continue
            try:
                registry[fingerprint] = int(cli.call("supernode", "register", str(key))["node-id"])
            except UserError as exc:
                if "already in use" in str(exc):  # Flower never takes a key it has seen again
                    raise UserError(
                        f"{key} was registered with this SuperLink, but not by this run's record of keys "
                        f"({registry_path}), and Flower never registers a key twice: start the run afresh with --overwrite"
                    ) from None
                raise
    finally:
        write_json_atomic(registry_path, registry)


def check_security_mode(out: Path, dep: Deployment, resume: bool) -> None:
    """A resume may not weaken the run's transport security or node authentication; one
    whose record is missing cannot tell, and is refused."""
    path = out / SECURITY_RECORD
    now = {"tls": dep.tls_dir is not None, "node_auth": bool(dep.auth_keys)}
    if resume:
        if not path.is_file():
            raise UserError(
                f"{out} has no {SECURITY_RECORD}: it is not a coordinator's run folder, or it lost the record of "
                "how the run was secured; start afresh with --overwrite"
            )
        before = json.loads(path.read_text())
        if before.get("tls") and not now["tls"]:
            raise UserError("this run was started with TLS: resume it with --tls-dir, not --insecure")
        if before.get("node_auth") and not now["node_auth"]:
            raise UserError("this run was started with node authentication: resume it with --auth-keys")
    write_json_atomic(path, now)


def write_app(folder: Path, cfg: RunConfig, out_dir: Path, resume: bool, log_name: str, hold_until: str = "") -> Path:
    """The Flower app folder (just its pyproject) and the run config file for ``flwr run``.
    A simulation under attack runs the attacking ClientApp (``fedlora coordinator`` refuses
    attack settings). The ServerApp works in ``out_dir`` (the SuperLink tells it so): the
    run folder is ``.`` and ``hold_until`` a path inside it. Flower hands a run's config to
    every SuperNode, so the coordinator's own settings (where it reports to, its run folder
    and data files) go to the ServerApp in a private file of ``out_dir``."""
    pyproject = APP_PYPROJECT
    if cfg.attack_clients:
        pyproject = pyproject.replace(f'"{TRUSTED_CLIENTAPP}"', f'"{ATTACK_CLIENTAPP}"')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(pyproject)
    write_server_settings(out_dir, cfg, paths=True)
    run_config = folder.parent / "run-config.toml"
    run_config.write_text(
        f"fedlora-config = {json.dumps(json.dumps(cfg.for_agents()))}\n"
        f'out-dir = "."\nresume = {str(resume).lower()}\n'
        f"log-name = {json.dumps(log_name)}\nhold-until = {json.dumps(hold_until)}\n"
    )
    return run_config


def follow_run(
    cli: _Flower, run_id: str, superlink: subprocess.Popen, superlink_log: Path, log_path: Path, offset: int, progress
) -> None:
    """Echo the run's progress log until the run finishes; raise UserError unless it completed.
    With ``--verbose``, Flower's own log (and what the apps print) goes to stderr as well."""
    last_ask = last_news = time.monotonic()
    flower_offset = superlink_log.stat().st_size if superlink_log.is_file() else 0
    while True:
        time.sleep(POLL_S)
        offset, lines = _echo_new_lines(log_path, offset, progress)
        if verbose():
            flower_offset, _ = _echo_new_lines(superlink_log, flower_offset, _to_stderr)
        if superlink.poll() is not None:
            raise UserError(f"the SuperLink exited with status {superlink.returncode}: {last_line(superlink_log)}")
        now = time.monotonic()
        last_news = now if lines else last_news
        if any(line.startswith(FINISHED) for line in lines):  # this run's lines, not a resumed one's
            # the ServerApp's last line, written after all its outputs: the run completed. Flower
            # reports it finished only once its runtime has wound down, up to 20 s later.
            return
        # each flwr call costs a second of CPU, taken from the clients in a simulation: ask only
        # after a quiet spell, and not while the ServerApp's process lives (a run that failed
        # writes no more progress; one whose app is alive is still running)
        if now - last_ask < STATUS_EVERY_S or now - last_news < STATUS_EVERY_S or runs_flower_app(superlink):
            continue
        last_ask = now
        runs = cli.call("ls", "--run-id", str(run_id)).get("runs", [])
        status = runs[0].get("status", "") if runs else ""
        if status.startswith("finished"):
            _echo_new_lines(log_path, offset, progress)
            if status != "finished:completed":
                detail = runs[0].get("status-details") or last_line(log_path)
                raise UserError(f"the run {status}: {detail} (Flower's log: {superlink_log})")
            return


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _echo_new_lines(path: Path, offset: int, progress) -> tuple[int, list[str]]:
    """Pass the log's lines after ``offset`` to ``progress``; the new offset and those lines."""
    if not path.is_file():
        return offset, []
    with path.open() as fh:
        fh.seek(offset)
        lines = fh.read().splitlines()
        for line in lines:
            progress(line)
        return fh.tell(), lines


def superlink_command(
    flower: Path, max_message_bytes: int, simulation: bool = False
) -> tuple[list[str], dict[str, str], Path]:
    """fedlora's SuperLink with its local API on the socket in ``flower`` (made 0700), the
    environment that routes Flower's own processes to it, and the ``flwr`` launcher. The
    ServerApp works in ``flower``'s parent (the run folder, or a serving coordinator's).
    ``simulation``: Flower's simulation runtime, which may run fedlora's simulated attacker."""
    flower_executable("flower-superlink")  # a clear error where flwr is missing
    private_folder(flower)
    for stale in (flower / TOKEN_DIR).glob("*") if (flower / TOKEN_DIR).is_dir() else ():
        stale.unlink(missing_ok=True)  # tokens of app processes that never started
    sock = flower / SOCKET_NAME
    launchers = write_launchers(flower / "bin", sock, flower / "cli", simulation=simulation)
    cmd = [sys.executable, "-m", "fedlora.deploy.superlink", "--max-message-bytes", str(max_message_bytes)]
    cmd += ["--max-reply-bytes", str(max_message_bytes), "--max-reply-objects", str(MAX_REPLY_OBJECTS)]
    cmd += ["--api-socket", str(sock), "--host", "127.0.0.1", "--port", str(NOMINAL_PORT)]
    cmd += ["--disable-runtime-dependency-installation"]  # run on this environment, never install into it
    env = child_env(flower / "superlink")
    env["PATH"] = str(launchers) + os.pathsep + env["PATH"]  # Flower starts its processes by name
    env[SERVED_FOLDER_ENV] = str(flower.parent)
    return cmd, env, launchers / "flwr"


def _start_superlink(
    dep: Deployment,
    flower: Path,
    fleet_address: str,
    log_path: Path,
    max_message_bytes: int,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen, _Flower]:
    cmd, env, flwr = superlink_command(flower, max_message_bytes)
    if dep.tls_dir is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(dep.tls_dir / "ca.crt"), "--ssl-certfile", str(dep.tls_dir / "server.pem")]
        cmd += ["--ssl-keyfile", str(dep.tls_dir / "server.key")]
    cmd += ["--fleet-api-address", fleet_address]
    # registrations and node ids outlive the process: after a crash, --resume finds the
    # client agents (which keep retrying) under the ids they had
    cmd += ["--database", str(flower / "state.db")]
    if dep.auth_keys:
        cmd.append("--enable-supernode-auth")
    superlink = start(cmd, env, log_path, cwd=cwd)
    try:
        wait_for_socket(flower / SOCKET_NAME, superlink, dep.startup_timeout_s, "the SuperLink")
    except UserError as exc:
        stop(superlink)
        raise UserError(f"{exc}: {last_line(log_path)}") from None
    return superlink, _Flower(flower / "cli", flwr, dep.tls_dir)


def _prepare(out: Path, dep: Deployment, resume: bool, cap: int) -> Path:
    """The run folder's Flower state, the security record and the registered keys; returns
    the SuperLink's log."""
    flower = private_folder(out / ".flower")  # Flower's state, the API socket, the launchers: the operator's alone
    (flower / "superlink").mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run: no log, registrations or runs of an earlier one in this folder
        (out / LOG_NAME).unlink(missing_ok=True)
        for name in ("state.db", "state.db-wal", "state.db-shm", REGISTERED_KEYS):
            (flower / name).unlink(missing_ok=True)
    check_security_mode(out, dep, resume)
    terminate_on_sigterm()
    superlink_log = flower / "superlink.log"
    if dep.auth_keys:
        # register the keys while the client API listens on a private loopback port only:
        # an agent that connects before its key is registered would be refused for good
        superlink, cli = _start_superlink(dep, flower, f"127.0.0.1:{free_loopback_port()}", superlink_log, cap)
        try:
            sync_registered_keys(cli, dep.auth_keys, flower / REGISTERED_KEYS)
        finally:
            stop(superlink)
    return superlink_log


def _banner(dep: Deployment) -> str:
    keys = f", {len(dep.auth_keys)} registered client keys" if dep.auth_keys else ""
    return f"fedlora coordinator: SuperLink on {dep.address} ({'TLS' if dep.tls_dir else 'insecure'}{keys})"


def coordinate(cfg: RunConfig, dep: Deployment, out_dir: Path, resume: bool = False, progress=print) -> Path:
    """Start the SuperLink, submit the run, echo its progress, stop everything; the
    outputs land in ``out_dir``. Raises UserError when the run fails."""
    out = Path(out_dir).resolve()
    flower, log_path = out / ".flower", out / LOG_NAME
    cap = superlink_message_cap(cfg.max_update_mb)
    superlink_log = _prepare(out, dep, resume, cap)
    superlink, cli = _start_superlink(dep, flower, dep.address, superlink_log, cap)
    try:
        progress(f"{_banner(dep)}; waiting for {cfg.clients} clients")
        run_config = write_app(flower / "app", cfg, out, resume, LOG_NAME)
        run_id = cli.call("run", str(flower / "app"), "local", "--run-config", str(run_config))["run-id"]
        offset = log_path.stat().st_size if resume and log_path.is_file() else 0  # echo only what is new
        follow_run(cli, run_id, superlink, superlink_log, log_path, offset, progress)
        return out
    finally:
        stop(superlink)


def serve(dep: Deployment, cfg: RunConfig, out_dir: Path, resume: bool = False, progress=print) -> None:
    """``--serve``: the SuperLink alone, for runs submitted with ``OUT/.flower/bin/flwr run .``
    (Flower's command, talking to the control API through the socket only the operator can
    open); each run's ServerApp works in ``out_dir``, so a run without ``out-dir`` writes
    ``out_dir/runs/<timestamp>-<strategy>``.
    Of ``cfg``, the message cap (``max_update_mb``) and the coordinator's own settings
    (``--track``) apply to every run it serves. Returns when interrupted (Ctrl-C, SIGTERM);
    raises UserError if the SuperLink dies."""
    out = Path(out_dir).resolve()
    cap = superlink_message_cap(cfg.max_update_mb)
    superlink_log = _prepare(out, dep, resume, cap)
    write_server_settings(out, cfg)
    superlink, cli = _start_superlink(dep, out / ".flower", dep.address, superlink_log, cap, cwd=out)
    try:
        progress(f"{_banner(dep)}; serving runs until stopped (Ctrl-C)")
        progress(f"submit one with: {cli.exe} run . --stream (Flower's flwr, through the socket only you can open)")
        progress(f"runs write their folders under {out / 'runs'} (or their out-dir); Flower's log: {superlink_log}")
        while superlink.poll() is None:
            time.sleep(POLL_S)
        raise UserError(f"the SuperLink exited with status {superlink.returncode}: {last_line(superlink_log)}")
    except KeyboardInterrupt:
        progress("fedlora coordinator: stopped")
    finally:
        stop(superlink)
