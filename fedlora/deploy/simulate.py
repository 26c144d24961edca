"""``fedlora simulate``: the run on Flower's simulation runtime, the way ``flwr run`` starts it.

A SuperLink in simulation mode (its API on a Unix socket only this user can open, its state
under ``OUT/.flower``, as ``fedlora coordinator`` runs it) receives the
run as a Flower app whose code is the installed fedlora (``fedlora.server.app:app`` and
``fedlora.client.app:app``) and whose run config carries the settings; it runs the app in
Flower's ``flwr-simulation`` process with ``--clients`` virtual SuperNodes on the Ray backend.
The ServerApp writes ``run.log`` in the run folder, which this process echoes.

Flower's runtime starts while this process checks the run's inputs, which costs it torch's,
transformers' and the data's imports and loads: the SuperLink at once, the run as soon as
torch says where the clients train. The run is held (its ``hold-until`` file) until the checks
pass; if they fail, Flower is stopped and what this call made of the run folder removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.deploy.coordinator import (
    _Flower,
    _FlowerCall,
    follow_run,
    superlink_command,
    superlink_message_cap,
    write_app,
)
from fedlora.deploy.local_api import SOCKET_NAME, wait_for_socket
from fedlora.deploy.processes import kill_tree, last_line, start, stop, terminate_on_sigterm
from fedlora.errors import UserError
from fedlora.flower.simulation import quiet_flower, simulated_client_resources
from fedlora.quiet import verbose

LOG_NAME = "run.log"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # Ray's shared-memory store: the tensors that cross are small
STARTUP_TIMEOUT_S = 120.0
RELEASE_NAME = "inputs-checked"  # under .flower: the held ServerApp starts once it exists


def federation_config(cfg: RunConfig, cpus: int, progress=print) -> str:
    """``flwr run --federation-config``: the virtual SuperNodes and each one's Ray resources."""
    resources = simulated_client_resources(cfg, cpus, progress)
    pairs = {
        "num-supernodes": cfg.clients,
        "client-resources-num-cpus": int(resources["num_cpus"]),
        "client-resources-num-gpus": float(resources["num_gpus"]),
        "init-args-num-cpus": cpus,
        "init-args-logging-level": '"WARNING"' if verbose() else '"ERROR"',
        "init-args-log-to-driver": "false",
    }
    if resources["num_gpus"]:
        import torch  # lazy: only for a GPU share, which simulated_client_resources found CUDA for

        pairs["init-args-num-gpus"] = torch.cuda.device_count()  # the GPUs torch sees, whatever Ray detects
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def _start_simulation_superlink(cfg: RunConfig, flower: Path, log_path: Path) -> tuple[subprocess.Popen, Path]:
    """Flower's SuperLink in simulation mode, its API on the socket in ``flower``; not waited
    for. Returns it and the ``flwr`` launcher."""
    cmd, env, flwr = superlink_command(flower, superlink_message_cap(cfg.max_update_mb), simulation=True)
    cmd += ["--insecure", "--simulation", "--isolation", "subprocess"]
    env.setdefault("RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES", str(OBJECT_STORE_BYTES))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return start(cmd, env, log_path), flwr


def _submit_held_run(
    cfg: RunConfig, out: Path, resume: bool, superlink: subprocess.Popen, flwr: Path, said: list[str]
) -> tuple[_FlowerCall, _Flower]:
    """``flwr run`` for ``cfg``, started, its ServerApp held until ``RELEASE_NAME`` appears; and
    the ``flwr`` command. What there is to say of the clients' resources goes to ``said``."""
    flower = out / ".flower"
    federation = federation_config(cfg, os.cpu_count() or 1, said.append)
    try:
        wait_for_socket(flower / SOCKET_NAME, superlink, STARTUP_TIMEOUT_S, "the simulation SuperLink")
    except UserError as exc:
        raise UserError(f"{exc}: {last_line(flower / 'superlink.log')}") from None
    cli = _Flower(flower / "cli", flwr, None)
    # the ServerApp works in ``out``: the hold is a path inside it
    run_config = write_app(flower / "app", cfg, out, resume, LOG_NAME, hold_until=f".flower/{RELEASE_NAME}")
    return cli.start(
        "run", str(flower / "app"), "local", "--run-config", str(run_config), "--federation-config", federation
    ), cli


def _check_then_release(cfg: RunConfig, out: Path, out_dir: Path, resume: bool, said: list[str], progress) -> int:
    """Check the inputs, say what runs, and release the held run; the run log's offset to echo from."""
    from fedlora.flower.checks import check_inputs  # lazy: torch, transformers and the data, while Flower starts

    check_inputs(cfg)
    progress(f"fedlora simulate: {cfg.strategy}, {cfg.clients} clients, {cfg.rounds} rounds -> {out_dir}")
    if cfg.attack_clients:
        progress(
            f"simulated attack: client(s) {list(cfg.attack_clients)} send {cfg.attack_kind!r} updates (scale {cfg.attack_scale:g})"
        )
    for line in said:
        progress(line)
    log_path = out / LOG_NAME
    offset = log_path.stat().st_size if resume and log_path.is_file() else 0
    if not resume:
        log_path.unlink(missing_ok=True)
    (out / ".flower" / RELEASE_NAME).touch()
    return offset


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder on the way to ``path`` that does not exist yet (None: all do)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def simulate(cfg: RunConfig, out_dir: Path, progress=print, resume: bool = False) -> Path:
    """Run ``cfg`` on Flower's simulation runtime; the outputs land in ``out_dir``. Raises
    UserError when the run fails."""
    out = Path(out_dir).resolve()
    flower = out / ".flower"
    made = _outermost_missing(flower)  # removed if the checks fail
    (flower / "superlink").mkdir(parents=True, exist_ok=True)
    (flower / RELEASE_NAME).unlink(missing_ok=True)
    quiet_flower()
    terminate_on_sigterm()
    superlink_log = flower / "superlink.log"
    superlink, flwr = _start_simulation_superlink(cfg, flower, superlink_log)
    submission, said = None, []
    try:
        submission, cli = _submit_held_run(cfg, out, resume, superlink, flwr, said)
        offset = _check_then_release(cfg, out, out_dir, resume, said, progress)
    except BaseException:  # the run has not touched its folder: leave no trace of it
        if submission is not None:
            submission.kill()
        kill_tree(superlink)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    try:
        run_id = submission.result()["run-id"]
        follow_run(cli, run_id, superlink, superlink_log, out / LOG_NAME, offset, progress)
        # the outputs are saved: Flower reporting the run finished and Ray stopping would take seconds
        kill_tree(superlink)
        return out_dir
    finally:
        stop(superlink)
        sys.stdout.flush()
