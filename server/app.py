"""The coordinator's ServerApps: one built per simulation, one deployed under a SuperLink."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.server.federation import Federation, Progress

log = logging.getLogger("fedlora")


def make_server_app(cfg: RunConfig, out_dir: Path, progress: Progress = print, resume: bool = False) -> ServerApp:
    """A simulation's ServerApp; its simulated clients keep their accountants under ``out_dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        Federation(grid, cfg, out_dir, progress=progress, resume=resume, client_state_dir=out_dir / "clients").run()

    return app


app = ServerApp()  # the coordinator's ServerApp under a SuperLink (``fedlora coordinator``)


@app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """The run config carries the fedlora settings as JSON, the output folder and whether to
    resume; progress goes to ``coordinator.log`` there, which ``fedlora coordinator`` echoes."""
    cfg = RunConfig.from_dict(json.loads(str(context.run_config["fedlora-config"])))
    out_dir = Path(str(context.run_config["out-dir"]))
    own = out_dir / ".flower" / "server-settings.json"  # fedlora coordinator's, kept off the run config
    if own.is_file():
        cfg.update(json.loads(own.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "coordinator.log"

    def progress(line: str) -> None:
        with log_path.open("a") as fh:
            fh.write(line + "\n")

    logging.basicConfig(level=logging.INFO)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    resume = bool(context.run_config.get("resume", False))
    # the SuperLink keeps client registrations across a restart, each online until its last
    # heartbeat's deadline: HEARTBEAT_PATIENCE intervals (the agents use Flower's default)
    stale_s = float(HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_PATIENCE) if resume else 0.0
    summary = Federation(grid, cfg, out_dir, progress=progress, resume=resume, stale_nodes_s=stale_s).run()
    progress(f"run finished: final accuracy {summary['final_accuracy']}")
