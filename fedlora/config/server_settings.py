"""The coordinator's own settings (where it reports to: ``--track``, ``--track-uri``; for a run
it submits itself also its paths: ``--out``, ``--data``, ``--eval-data``), kept off the run
config that Flower hands every SuperNode: a private file that its ServerApp reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedlora.config.run_config import RunConfig

SERVER_SETTINGS = ".flower/server-settings.json"
# the folder a ServerApp started by fedlora's SuperLink works in (its run config's paths are
# inside it): the run folder, or a serving coordinator's --out. Unset: its working folder.
SERVED_FOLDER_ENV = "FEDLORA_SERVED_FOLDER"


def write_server_settings(folder: Path, cfg: RunConfig, paths: bool = False) -> None:
    """``cfg``'s server-only settings, readable by this user alone, in ``folder/.flower``: a
    run folder's, or a serving coordinator's for every run it serves. ``paths``: also the
    coordinator's paths (a run it submits itself; the runs it serves bring their own)."""
    shared = cfg.for_agents() if paths else cfg.for_clients()
    own = {k: v for k, v in cfg.to_dict().items() if k not in shared}
    private = folder / SERVER_SETTINGS
    private.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(json.dumps(own))
    private.chmod(0o600)  # one written before with other modes


def read_server_settings(out_dir: Path, workdir: Path) -> dict[str, Any]:
    """The run folder's settings, else those of a serving coordinator (the ServerApp's working folder)."""
    for own in (out_dir / SERVER_SETTINGS, workdir / SERVER_SETTINGS):
        if own.is_file():
            return json.loads(own.read_text())
    return {}
