"""Experiment tracking (``--track tensorboard|mlflow``): every round's record per round
step, the run's settings as parameters, and at the end the final scores, ``report.png``
and ``adapter/``.

Each tracker is an optional extra of the same name (``pip install 'fedlora[mlflow]'``),
imported only by a run that chooses it; ``require_tracker`` checks at start that it is
installed. The coordinator calls a ``Tracker`` where it appends to ``metrics.jsonl``, so a
simulation and a deployment log the same records. A tracker that fails in the middle of a
run says so once and stops tracking; the run goes on.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedlora.errors import UserError
from fedlora.io.record import RoundRecord
from fedlora.io.report import write_json_atomic

# the module each tracker imports; its extra has the tracker's name
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}
STATE_FILE = "tracking.json"  # the MLflow run a resumed run continues
EXPERIMENT = "fedlora"
PROBE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}  # MLflow's experiment, unless MLFLOW_EXPERIMENT_NAME names another


def require_tracker(track: str) -> None:
    """A one-line UserError, before any training, when the chosen tracker is not installed."""
    module = MODULES.get(track)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:  # not installed, or an install that cannot load
        raise UserError(f"--track {track} needs the {track} package ({exc}): pip install 'fedlora[{track}]'") from None


def check_tracker(track: str, track_uri: str) -> None:
    """At start, before any training: the tracker is installed and, for MLflow, a given
    ``--track-uri`` answers (asked once, without MLflow's minutes of retries)."""
    require_tracker(track)
    if track != "mlflow" or not track_uri:
        return
    from mlflow.tracking import MlflowClient  # lazy: an optional extra, for --track mlflow only

    uri = mlflow_uri(track_uri, Path.cwd())
    saved = {k: os.environ.get(k) for k in PROBE_ENV}
    os.environ.update(PROBE_ENV)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow's errors: connection refused, a store it cannot open
        raise UserError(f"--track-uri {track_uri}: no MLflow tracking store answers ({_first_line(exc)})") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """Every numeric field of a round's record that holds a value; the round is the step."""
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name != "round" and isinstance(value, int | float) and not isinstance(value, bool):
            out[f.name] = float(value)
    return out


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``summary.json``, as ``summary/<key>`` (the last round's step)."""
    return {
        f"summary/{k}": float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Settings as strings: lists comma-joined, unset ones empty."""
    out = {}
    for key, value in config.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        out[key] = "" if value is None else str(value)
    return out


class Tracker:
    """Where a run reports besides its own folder. This one tracks nothing (``--track none``)."""

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_final(self, step: int, metrics: dict[str, float], out_dir: Path) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir``: scalars per round, the settings as hyperparameters and as
    text, the report as an image. TensorBoard keeps no files, so ``adapter/`` stays where it is."""

    def __init__(self, log_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter  # lazy: an optional extra, for --track tensorboard only

        # a resumed run hides what a crashed attempt logged from its first round on
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step if first_step > 1 else None)

    def log_params(self, params: dict[str, str]) -> None:
        from torch.utils.tensorboard.summary import hparams  # lazy: an optional extra, for --track tensorboard only

        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()))

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_final(self, step: int, metrics: dict[str, float], out_dir: Path) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        if (out_dir / "report.png").is_file():
            import numpy as np  # lazy: only a run's end reads the report
            from PIL import Image  # lazy: matplotlib's dependency; only a run's end reads the report

            with Image.open(out_dir / "report.png") as image:
                self.writer.add_image("report", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self, ok: bool) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per fedlora run (a resumed run continues it): metrics per round step,
    the settings as parameters, ``report.png`` and ``adapter/`` as artifacts."""

    def __init__(self, uri: str, out_dir: Path, run_name: str, resume: bool):
        from mlflow.tracking import MlflowClient  # lazy: an optional extra, for --track mlflow only

        self.client = MlflowClient(tracking_uri=uri)
        state_path = out_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
        if state.get("mlflow_uri") == uri and state.get("mlflow_run_id"):
            self.run_id = state["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
            write_json_atomic(state_path, {"mlflow_uri": uri, "mlflow_run_id": self.run_id})

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param  # lazy: an optional extra, for --track mlflow only

        # MLflow caps a parameter's value (6,000 characters); no setting comes near
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric  # lazy: an optional extra, for --track mlflow only

        now = _millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_final(self, step: int, metrics: dict[str, float], out_dir: Path) -> None:
        self.log_round(step, metrics)
        if (out_dir / "report.png").is_file():
            self.client.log_artifact(self.run_id, str(out_dir / "report.png"))
        if (out_dir / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(out_dir / "adapter"), artifact_path="adapter")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _millis() -> int:
    return int(time.time() * 1000)


def mlflow_uri(track_uri: str, out_dir: Path) -> str:
    """``--track-uri`` as MLflow takes it; by default a file store in the run folder. A file
    store is in maintenance mode in MLflow 3, which refuses it unless allowed."""
    uri = track_uri or (out_dir / "mlruns").resolve().as_uri()
    if "://" not in uri or uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if "://" not in uri and not uri.startswith("file:"):
            uri = Path(uri).resolve().as_uri()
    return uri


def open_tracker(track: str, track_uri: str, out_dir: Path, first_round: int, resume: bool) -> Tracker:
    """The run's tracker; an MLflow store or server that cannot be reached is a UserError."""
    require_tracker(track)
    if track == "tensorboard":
        log_dir = Path(track_uri) if track_uri else out_dir / "tensorboard"
        if not track_uri and not resume:  # a fresh run in this folder: no curves of the one it replaces
            shutil.rmtree(log_dir, ignore_errors=True)
        return TensorBoardTracker(log_dir, first_round)
    if track == "mlflow":
        uri = mlflow_uri(track_uri, out_dir)
        try:
            return MlflowTracker(uri, out_dir, out_dir.name, resume)
        except Exception as exc:  # MLflow's errors: an unreachable server, a refused store
            raise UserError(f"--track mlflow: cannot open a run at {uri}: {_first_line(exc)}") from None
    return Tracker()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


class SafeTracker:
    """A tracker whose first failure is reported once through ``progress`` and ends the
    tracking, never the run."""

    def __init__(self, tracker: Tracker, progress):
        self.tracker, self.progress = tracker, progress

    def call(self, method: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as exc:  # a tracking server that went away must not end a federated run
            self.progress(f"tracking stopped: {method} failed: {_first_line(exc)}")
            self.tracker = None
