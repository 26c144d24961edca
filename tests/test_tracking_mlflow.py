"""--track mlflow on a real run, read back with MlflowClient from the run folder's file store:
the metrics per round step, the settings as parameters, report.png and adapter/ as artifacts.

mlflow (fedlora[mlflow]) is not in the test extra (it brings some twenty packages); .ci/run
installs it and runs this file last."""

import json

import pytest
from conftest import TINY_RUN_ARGS

from fedlora.cli import main
from fedlora.io.report import read_metrics
from fedlora.io.tracking import STATE_FILE, mlflow_uri, open_tracker

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'fedlora[mlflow]' (CI does)")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlflow") / "run"
    assert main([*TINY_RUN_ARGS, "--track", "mlflow", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def logged(run_dir):
    client = MlflowClient(tracking_uri=mlflow_uri("", run_dir))
    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"]
    return client, client.get_run(run_id)


def test_every_numeric_field_of_every_round_is_logged_at_its_round(run_dir, logged):
    client, run = logged
    assert run.info.status == "FINISHED" and (run_dir / "mlruns").is_dir()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    checked = 0
    for name in metrics[0]:
        values = [m[name] for m in metrics]
        if name == "round" or not all(isinstance(v, int | float) for v in values):
            continue
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == {m["round"]: pytest.approx(m[name], rel=1e-12) for m in metrics}, name
        checked += 1
    assert checked >= 18
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/final_accuracy"] == pytest.approx(summary["final_accuracy"])


def test_the_settings_are_parameters_and_the_outputs_artifacts(run_dir, logged):
    client, run = logged
    saved = json.loads((run_dir / "config.json").read_text())
    assert set(run.data.params) == set(saved)
    assert run.data.params["rounds"] == "2" and run.data.params["track"] == "mlflow"
    assert run.data.params["target_modules"] == ",".join(saved["target_modules"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.png", "adapter"} <= top
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert adapter == {f"adapter/{p.name}" for p in (run_dir / "adapter").iterdir()}


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    first = open_tracker("mlflow", "", tmp_path, first_round=1, resume=False)
    first.close(ok=False)
    again = open_tracker("mlflow", "", tmp_path, first_round=3, resume=True)
    assert again.run_id == first.run_id
    again.close(ok=True)
    fresh = open_tracker("mlflow", "", tmp_path, first_round=1, resume=False)
    assert fresh.run_id != first.run_id
    fresh.close(ok=True)
    assert MlflowClient(mlflow_uri("", tmp_path)).get_run(first.run_id).info.status == "FINISHED"


def test_a_tracking_server_that_does_not_answer_is_one_line_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--track", "mlflow", "--track-uri", "http://127.0.0.1:1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--track-uri http://127.0.0.1:1: no MLflow tracking store answers" in err[0]
    assert not out.exists()  # before the run starts
