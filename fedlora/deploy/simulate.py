"""``fedlora simulate``: the run on Flower's simulation runtime, the way ``flwr run`` starts it.

A SuperLink in simulation mode (loopback only, its state under ``OUT/.flower``) receives the
run as a Flower app whose code is the installed fedlora (``fedlora.server.app:app`` and
``fedlora.client.app:app``) and whose run config carries the settings; it runs the app in
Flower's ``flwr-simulation`` process with ``--clients`` virtual SuperNodes on the Ray backend.
The ServerApp writes ``run.log`` in the run folder, which this process echoes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.deploy.coordinator import _Flower, follow_run, write_app
from fedlora.deploy.processes import (
    child_env,
    flower_executable,
    free_loopback_port,
    last_line,
    start,
    stop,
    terminate_on_sigterm,
    wait_for_port,
)
from fedlora.errors import UserError
from fedlora.flower.simulation import check_inputs, quiet_flower, simulated_client_resources
from fedlora.quiet import verbose

LOG_NAME = "run.log"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # Ray's shared-memory store: the tensors that cross are small
STARTUP_TIMEOUT_S = 120.0


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
        import torch  # lazy: only for a GPU share, which check_inputs found CUDA for

        pairs["init-args-num-gpus"] = torch.cuda.device_count()  # the GPUs torch sees, whatever Ray detects
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def _start_simulation_superlink(flower: Path, log_path: Path) -> tuple:
    """Flower's SuperLink in simulation mode, every API on a free loopback port."""
    port = free_loopback_port()
    cmd = [flower_executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--disable-runtime-dependency-installation"]  # run on this environment, never install into it
    env = child_env(flower / "superlink")
    env.setdefault("RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES", str(OBJECT_STORE_BYTES))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env["PYTHONUNBUFFERED"] = "1"
    superlink = start(cmd, env, log_path)
    try:
        wait_for_port("127.0.0.1", port, superlink, STARTUP_TIMEOUT_S, "the simulation SuperLink")
    except UserError as exc:
        stop(superlink)
        raise UserError(f"{exc}: {last_line(log_path)}") from None
    return superlink, _Flower(flower / "cli", port, None)


def simulate(cfg: RunConfig, out_dir: Path, progress=print, resume: bool = False) -> Path:
    """Run ``cfg`` on Flower's simulation runtime; the outputs land in ``out_dir``. Raises
    UserError when the run fails."""
    check_inputs(cfg)
    out = Path(out_dir).resolve()
    progress(f"fedlora simulate: {cfg.strategy}, {cfg.clients} clients, {cfg.rounds} rounds -> {out_dir}")
    if cfg.attack_clients:
        progress(
            f"simulated attack: client(s) {list(cfg.attack_clients)} send {cfg.attack_kind!r} updates (scale {cfg.attack_scale:g})"
        )
    quiet_flower()
    federation = federation_config(cfg, os.cpu_count() or 1, progress)
    flower = out / ".flower"
    (flower / "superlink").mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    offset = log_path.stat().st_size if resume and log_path.is_file() else 0
    if not resume:
        log_path.unlink(missing_ok=True)
        offset = 0
    terminate_on_sigterm()
    superlink_log = flower / "superlink.log"
    superlink, cli = _start_simulation_superlink(flower, superlink_log)
    try:
        run_config = write_app(flower / "app", cfg, out, resume, LOG_NAME)
        args = ["run", str(flower / "app"), "local", "--run-config", str(run_config)]
        run_id = cli.call(*args, "--federation-config", federation)["run-id"]
        follow_run(cli, run_id, superlink, superlink_log, log_path, offset, progress)
        return out_dir
    finally:
        stop(superlink)
        sys.stdout.flush()
