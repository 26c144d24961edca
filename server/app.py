"""The coordinator's ServerApp, one for every way a run starts: ``fedlora simulate`` (under a
SuperLink in simulation mode), ``fedlora coordinator`` (under a deployed SuperLink) and
``flwr run .`` from a checkout (pyproject.toml's ``[tool.flwr.app]``, either federation).

This module imports no torch: Flower loads the ServerApp and then the ClientApp under one
lock, and its simulation runtime starts Ray only once both are loaded, so torch and the
model code load inside ``main``, while Ray starts."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.config.server_settings import SERVED_FOLDER_ENV, read_server_settings
from fedlora.errors import UserError
from fedlora.flower.simulation import clients_train_on_cpu

log = logging.getLogger("fedlora")

# run-config keys that are not settings: the whole settings as JSON (what ``fedlora simulate``
# and ``fedlora coordinator`` submit), the run folder, whether to resume, the progress log's
# name in the run folder and the file whose arrival releases a held run. The paths are
# relative to the served folder and stay inside it (``inside_served``).
RUN_KEYS = ("fedlora-config", "out-dir", "resume", "log-name", "hold-until")
HOLD_TIMEOUT_S = 600.0


def simulated(grid: Grid) -> bool:
    """Whether the clients are virtual: Flower's simulation runtime hands the ServerApp its
    in-memory grid (``flwr.superlink.grid.inmemory_grid.InMemoryGrid``), a SuperLink a gRPC one."""
    return type(grid).__name__ == "InMemoryGrid"


def run_settings(run_config: Mapping[str, Any]) -> RunConfig:
    """The run's settings: the ``fedlora-config`` JSON, then any setting given as its own
    key (``flwr run . --run-config "rounds=2"``); an empty string leaves a setting unset."""
    cfg = RunConfig.from_dict(json.loads(str(run_config.get("fedlora-config") or "{}")))
    cfg.update({k: v for k, v in run_config.items() if k not in RUN_KEYS and v != ""})
    cfg.validate()
    return cfg


def served_folder() -> Path:
    """The folder the ServerApp serves from: the run folder or serving coordinator's ``--out``
    that fedlora's SuperLink names, else its working folder (``flwr run .`` on another SuperLink)."""
    return Path(os.environ.get(SERVED_FOLDER_ENV) or Path.cwd()).resolve()


def inside_served(served: Path, key: str, value: str, hidden: bool = False) -> Path:
    """``value`` (the run config's ``key``) as a path inside ``served``: it must be relative,
    without ``..``, and stay inside once symbolic links are followed; without ``hidden``, no
    part of it may start with a dot (``.flower`` holds Flower's state and the API socket).
    UserError (one line) otherwise: whoever submits a run names no path outside the folder."""
    path = Path(value)
    if path.is_absolute():
        raise UserError(f"run config {key} = {value[:200]!r}: give a path relative to the served folder")
    if ".." in path.parts:
        raise UserError(f"run config {key} = {value[:200]!r}: '..' is not allowed")
    if not hidden and any(part.startswith(".") for part in path.parts):
        raise UserError(f"run config {key} = {value[:200]!r}: a hidden folder (such as .flower) is not allowed")
    full = (served / path).resolve()
    if not full.is_relative_to(served):
        raise UserError(f"run config {key} = {value[:200]!r}: it leads outside the served folder (a symbolic link)")
    return full


def log_name(run_config: Mapping[str, Any]) -> str:
    """``log-name``: a plain file name in the run folder, or ""."""
    name = str(run_config.get("log-name") or "")
    if name and (name in (".", "..") or name.startswith(".") or "/" in name):
        raise UserError(f"run config log-name = {name[:200]!r}: give a plain file name, not hidden")
    return name


def run_folder(run_config: Mapping[str, Any], cfg: RunConfig, served: Path) -> Path:
    """``out-dir`` (or the ``out`` setting), else ``runs/<timestamp>-<strategy>``, inside ``served``."""
    key = "out-dir" if run_config.get("out-dir") else "out"
    out = str(run_config.get("out-dir") or cfg.out or "")
    return inside_served(served, key, out or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.strategy}")


def check_simulated_nodes(grid: Grid, clients: int, timeout_s: float = 60.0) -> None:
    """A simulation's SuperNodes are the partitions: as many as ``clients``, or the run would
    wait for clients that never come (or train on partitions that do not exist)."""
    deadline = time.monotonic() + timeout_s
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the simulation runtime registers its nodes in one go
    nodes = len(list(grid.get_node_ids()))
    if nodes != clients:
        raise UserError(
            f"the federation simulates {nodes} SuperNodes, the run asks for clients = {clients}: "
            f'pass --federation-config "num-supernodes={clients}" to flwr run (or --run-config "clients={nodes}")'
        )


def wait_until_released(path: Path | None, timeout_s: float = HOLD_TIMEOUT_S) -> None:
    """``fedlora simulate`` submits its run while it still checks the inputs, so that Flower's
    runtime starts meanwhile, and holds the ServerApp until ``path`` exists: bad input stops
    the run before it has touched the run folder."""
    if path is None:
        return
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"the run waited {timeout_s:.0f} s for its input checks to release it ({path})")
        time.sleep(0.05)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Progress lines go to stdout (``flwr run --stream`` shows them) and, with ``log-name``,
    to that file in the run folder, which ``fedlora simulate`` and ``fedlora coordinator`` echo."""
    from fedlora.server.federation import Federation  # lazy: see the module's docstring

    run_config, served = context.run_config, served_folder()
    hold = str(run_config.get("hold-until") or "")
    wait_until_released(inside_served(served, "hold-until", hold, hidden=True) if hold else None)
    cfg = run_settings(run_config)
    out_dir = run_folder(run_config, cfg, served)
    name = log_name(run_config)
    cfg.update(read_server_settings(out_dir, served))  # the coordinator's own, kept off the run config
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / name if name else None

    def progress(line: str) -> None:
        print(line, flush=True)
        if log_path is not None:
            with log_path.open("a") as fh:
                fh.write(line + "\n")

    if log_path is not None:
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    resume = bool(run_config.get("resume", False))
    virtual = simulated(grid)
    if virtual:
        check_simulated_nodes(grid, cfg.clients)
    if log_path is None:
        progress(f"fedlora: {cfg.strategy}, {cfg.clients} clients, {cfg.rounds} rounds -> {out_dir}")
    # a deployed SuperLink keeps client registrations across a restart, each online until its
    # last heartbeat's deadline: HEARTBEAT_PATIENCE intervals (the agents use Flower's default)
    stale_s = float(HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_PATIENCE) if resume and not virtual else 0.0
    federation = Federation(
        grid,
        cfg,
        out_dir,
        progress=progress,
        resume=resume,
        stale_nodes_s=stale_s,
        client_state_dir=out_dir / "clients" if virtual else None,
        evaluate_beside_training=not (virtual and clients_train_on_cpu(cfg)),
    )
    summary = federation.run()
    accuracy = summary["final_accuracy"]
    progress(f"run finished: final accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'}")
