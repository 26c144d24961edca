"""When a round's evaluation runs: beside the next round's training, or (a simulation whose
clients train on this machine's CPU) before it, where it would only take the clients' cores."""

import threading
from types import SimpleNamespace

import pytest

from fedlora.config import RunConfig
from fedlora.flower.simulation import clients_train_on_cpu
from fedlora.server import federation as federation_module
from fedlora.server.federation import Federation


class FakeBridge:
    global_state: dict = {}

    def configure_train(self, rnd, *args):
        return [rnd]

    def aggregate_train(self, rnd, replies):
        pass


def rounds_run(tmp_path, monkeypatch, beside: bool) -> list[str]:
    events: list[str] = []
    lock = threading.Lock()

    def note(event: str) -> None:
        with lock:
            events.append(event)

    fed = Federation(None, RunConfig(rounds=3), tmp_path, evaluate_beside_training=beside)
    fed.bridge = FakeBridge()
    monkeypatch.setattr(federation_module, "send_and_receive", lambda grid, messages: note(f"train {messages[0]}"))
    monkeypatch.setattr(fed, "_unevaluated_record", lambda rnd, **_: SimpleNamespace(round=rnd, seconds=0.0))
    monkeypatch.setattr(fed, "_evaluate", lambda record, state: record)
    monkeypatch.setattr(fed, "_keep", lambda record: note(f"kept {record.round}"))
    for rnd in (1, 2, 3):
        fed.run_round(rnd)
    return events


def test_a_round_is_evaluated_and_kept_before_the_next_trains(tmp_path, monkeypatch):
    events = rounds_run(tmp_path, monkeypatch, beside=False)
    assert events == ["train 1", "kept 1", "train 2", "kept 2", "train 3", "kept 3"]


def test_beside_training_a_round_is_kept_once_the_next_has_trained(tmp_path, monkeypatch):
    events = rounds_run(tmp_path, monkeypatch, beside=True)
    assert events == ["train 1", "train 2", "kept 1", "train 3", "kept 2", "kept 3"]


@pytest.mark.parametrize("gpus_per_client", [None, 0.0, 0.5])
def test_simulated_clients_train_on_the_cpu_without_cuda_or_a_gpu_share(monkeypatch, gpus_per_client):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert clients_train_on_cpu(RunConfig(gpus_per_client=gpus_per_client))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert clients_train_on_cpu(RunConfig(gpus_per_client=gpus_per_client)) == (gpus_per_client == 0.0)
