"""--track tensorboard on a real run: the event files hold what metrics.jsonl and summary.json
hold, the settings and the report; a tracker that is not installed stops a run before it starts."""

import json
import subprocess
import sys
import tomllib

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fedlora.config import RunConfig
from fedlora.io.report import read_metrics


@pytest.fixture(scope="module")
def events(tracked_run):
    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_every_numeric_field_of_every_round_is_logged_at_its_round(tracked_run, events):
    metrics = read_metrics(tracked_run / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    logged = 0
    for m in metrics:
        for name, value in m.items():
            if name == "round" or not isinstance(value, int | float):
                continue
            by_step = {e.step: e.value for e in events.Scalars(name)}
            assert by_step[m["round"]] == pytest.approx(value, rel=1e-6, abs=1e-30), name
            logged += 1
    assert logged >= 2 * 18  # accuracy, loss, bytes, timings, ... (epsilon only under DP)
    assert "epsilon" not in events.Tags()["scalars"]  # a run without DP spends none


def test_the_summary_is_logged_at_the_last_round(tracked_run, events):
    summary = json.loads((tracked_run / "summary.json").read_text())
    for key in ("final_accuracy", "final_loss", "bytes_up_total", "bytes_down_total"):
        (event,) = events.Scalars(f"summary/{key}")
        assert (event.step, event.value) == (2, pytest.approx(summary[key], rel=1e-6))


def test_the_settings_are_hyperparameters_and_the_report_an_image(tracked_run, events):
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    saved = RunConfig.from_dict(json.loads((tracked_run / "config.json").read_text()))
    assert {k: v.string_value for k, v in hparams.items()}["rounds"] == "2" == str(saved.rounds)
    assert set(hparams) == set(saved.to_dict())
    (image,) = events.Images("report")
    assert image.step == 2 and image.width > 100 and image.height > 100


@pytest.mark.parametrize("track,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
@pytest.mark.parametrize(
    "command", [["simulate"], ["coordinator", "--serve", "--insecure", "--address", "127.0.0.1:1"]]
)
def test_a_missing_tracker_is_one_line_naming_its_extra_before_any_training(tmp_path, track, module, command):
    out = tmp_path / "run"
    code = (
        f"import sys; sys.modules[{module!r}] = None  # as if not installed\n"
        "from fedlora.cli import main\n"
        f"sys.exit(main([*{command!r}, '--track', {track!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'fedlora[{track}]'" in lines[0]
    assert not out.exists()  # no run folder, no training


def test_where_the_coordinator_reports_to_never_goes_to_clients():
    cfg = RunConfig(track="mlflow", track_uri="https://user:secret@mlflow.example.org")
    sent = cfg.for_clients()
    assert "track" not in sent and "track_uri" not in sent
    assert RunConfig.from_dict(sent).track == "none" and sent["rounds"] == cfg.rounds


def test_a_coordinator_keeps_its_tracking_settings_off_the_run_config_flower_shares(tmp_path):
    from fedlora.config.server_settings import SERVER_SETTINGS
    from fedlora.deploy.coordinator import write_app

    cfg = RunConfig(track="mlflow", track_uri="https://user:secret@mlflow.example.org")
    run_config = write_app(tmp_path / ".flower" / "app", cfg, tmp_path, resume=False, log_name="run.log")
    shared = json.loads(tomllib.loads(run_config.read_text())["fedlora-config"])
    assert "secret" not in run_config.read_text() and not {"track", "track_uri"} & set(shared)
    private = tmp_path / SERVER_SETTINGS
    own = json.loads(private.read_text())  # with the coordinator's paths, also kept off (test_coordinator_lockdown)
    assert (own["track"], own["track_uri"]) == ("mlflow", cfg.track_uri)
    assert set(own) == {"track", "track_uri", "out", "data", "eval_data"}
    assert private.stat().st_mode & 0o777 == 0o600


def test_a_serving_coordinators_tracking_holds_for_runs_without_their_own(tmp_path):
    from fedlora.config.server_settings import read_server_settings, write_server_settings

    served, run = tmp_path / "served", tmp_path / "served" / "runs" / "one"
    write_server_settings(served, RunConfig(track="tensorboard"))
    assert read_server_settings(run, workdir=served) == {"track": "tensorboard", "track_uri": ""}
    write_server_settings(run, RunConfig(track="mlflow"))  # a run folder's own settings come first
    assert read_server_settings(run, workdir=served)["track"] == "mlflow"
    assert read_server_settings(tmp_path / "elsewhere", workdir=tmp_path / "nowhere") == {}
