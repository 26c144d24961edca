"""Hardware settings: GPU shares of simulated clients, gradient checkpointing, and the
one-line refusals of what this machine cannot serve (no CUDA, no quantization kernels)."""

import pytest
import torch
from conftest import make_tiny_bert
from test_training_loop import Tokenizer, _data

from fedlora.cli import main
from fedlora.client.handler import simulated_device
from fedlora.config import RunConfig
from fedlora.flower import simulation
from fedlora.flower.simulation import client_resources, gpu_share, gpu_workers
from fedlora.ml import privacy, quantize
from fedlora.ml.adapters import LoRASpec, adapter_state, inject_lora, set_trainable
from fedlora.ml.models import set_gradient_checkpointing
from fedlora.ml.training import train_local

GIB = 2**30
MINILM = 22_700_000  # parameters of the default model


def test_on_the_cpu_one_worker_takes_every_core():
    assert gpu_share(None, 4, gpus=0, gpu_bytes=0, parameters=MINILM) == 0.0
    assert client_resources(0.0, cpus=16, gpus=0, clients=4) == {"num_cpus": 16, "num_gpus": 0.0}


@pytest.mark.parametrize(
    "clients,gpus,gpu_gib,parameters,share,workers",
    [
        (4, 1, 141, MINILM, 0.25, 4),  # all clients share one GPU at once
        (3, 1, 141, MINILM, 0.3333, 3),  # Ray counts shares in 1e-4
        (8, 2, 141, MINILM, 0.25, 8),  # four per GPU
        (4, 1, 8, 135_000_000, 0.5, 2),  # what memory allows: two 135M-parameter clients on 8 GiB
        (4, 1, 2, 1_000_000_000, 1.0, 1),  # nothing fits twice: one client at a time
        (100, 1, 141, MINILM, 0.0144, 16),  # at most one worker per core
    ],
)
def test_the_automatic_gpu_share(clients, gpus, gpu_gib, parameters, share, workers):
    got = gpu_share(None, clients, gpus, gpu_gib * GIB, parameters)
    assert got == share
    assert gpu_workers(got, gpus, clients, cpus=16) == workers
    assert client_resources(got, cpus=16, gpus=gpus, clients=clients) == {
        "num_cpus": max(1, 16 // workers),
        "num_gpus": share,
    }


def test_a_requested_share_is_taken_as_it_is():
    assert gpu_share(0.5, 4, gpus=1, gpu_bytes=GIB, parameters=10**10) == 0.5
    assert client_resources(0.5, cpus=16, gpus=1, clients=4) == {"num_cpus": 8, "num_gpus": 0.5}


def test_a_simulated_client_trains_on_cuda_only_with_a_share_and_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert simulated_device(RunConfig()).type == "cuda"  # auto
    assert simulated_device(RunConfig(gpus_per_client=0.25)).type == "cuda"
    assert simulated_device(RunConfig(gpus_per_client=0.0)).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert simulated_device(RunConfig()).type == "cpu"


def test_the_cpu_run_asks_ray_for_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert simulation.simulated_client_resources(RunConfig(), cpus=2, progress=print) == {
        "num_cpus": 2,
        "num_gpus": 0.0,
    }


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedlora: error: "), err
    return err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--gpus-per-client", "1.5"], "--gpus-per-client must be in [0, 1] (0: the CPU), got 1.5"),
        (["--gpus-per-client", "-0.25"], "--gpus-per-client must be in [0, 1] (0: the CPU), got -0.25"),
        (["--gpus-per-client", "0.00001"], "--gpus-per-client must be 0 or at least 0.0001"),
        (["--quantize", "2bit"], "unknown quantize '2bit': choose from none, 4bit, 8bit"),
    ],
)
def test_bad_hardware_flags_are_one_line(args, needle, capsys, tmp_path):
    assert main(["simulate", "--out", str(tmp_path / "o"), *args]) == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_gpu_share_without_cuda_is_refused_before_anything_starts(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["simulate", "--out", str(tmp_path / "o"), "--gpus-per-client", "0.25"]) == 2
    assert "--gpus-per-client 0.25 needs CUDA" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_quantizing_without_backend_support_is_refused_before_anything_starts(monkeypatch, capsys, tmp_path):
    import ray

    reason = "--quantize 4bit needs bitsandbytes (pip install 'fedlora[quantize]'): No module named 'bitsandbytes'"
    monkeypatch.setattr(quantize, "quantization_problem", lambda kind, device="cpu": reason)
    assert main(["simulate", "--out", str(tmp_path / "o"), "--quantize", "4bit"]) == 2
    assert one_line_error(capsys) == f"fedlora: error: {reason}"
    assert not (tmp_path / "o").exists() and not ray.is_initialized()
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    client = ["client", "--coordinator", "127.0.0.1:1", "--insecure", "--data", str(data), "--quantize", "4bit"]
    assert main([*client, "--state-dir", str(tmp_path / "s")]) == 2
    assert one_line_error(capsys).endswith(reason)
    assert not (tmp_path / "s").exists()  # refused before the agent took its state folder


def test_a_missing_bitsandbytes_is_named(monkeypatch):
    import sys

    quantize.quantization_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    try:
        assert quantize.quantization_problem("8bit").startswith("--quantize 8bit needs bitsandbytes (pip install")
    finally:
        quantize.quantization_problem.cache_clear()


@pytest.mark.parametrize(
    "line,needle",
    [
        ('quantize = "4bit"', "--quantize applies to fedlora simulate only; in a deployment each client agent"),
        ("gpus_per_client = 0.5", "--gpus-per-client applies to fedlora simulate only"),
    ],
)
def test_a_coordinator_refuses_the_simulated_clients_hardware(line, needle, capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f"[hardware]\n{line}\n")
    args = ["coordinator", "--address", "127.0.0.1:1", "--insecure", "--out", str(tmp_path / "o")]
    assert main([*args, "--config", str(config)]) == 2
    assert needle in one_line_error(capsys)


def test_gradient_checkpointing_is_an_on_off_flag(tmp_path):
    from fedlora.cli import build_parser, run_config_from_args

    config = tmp_path / "c.toml"
    config.write_text("[hardware]\ngradient_checkpointing = true\n")
    on = run_config_from_args(build_parser().parse_args(["simulate", "--config", str(config)]))
    off = run_config_from_args(
        build_parser().parse_args(["simulate", "--config", str(config), "--no-gradient-checkpointing"])
    )
    assert on.gradient_checkpointing is True and off.gradient_checkpointing is False
    assert RunConfig.from_dict(on.to_dict()) == on
    with pytest.raises(Exception, match="wrong type"):
        RunConfig.from_dict({"gradient_checkpointing": "yes"})


def _trained(checkpointing: bool, dp: bool) -> tuple[float, dict]:
    net = make_tiny_bert(dropout=0.0)
    torch.manual_seed(3)
    inject_lora(net, LoRASpec(4, 8.0, ("query", "value")))
    set_trainable(net, ["lora_A", "lora_B", "head"])
    set_gradient_checkpointing(net, checkpointing)
    assert net.is_activation_checkpointing == checkpointing
    plan = privacy.plan(8.0, 1e-5, 1.0, 40, 8, 10) if dp else None
    stats, _ = train_local(net, Tokenizer(), _data(40), steps=3, batch_size=8, lr=1e-2, max_length=8, seed=0, dp=plan)
    return stats.loss, adapter_state(net)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_gradient_checkpointing_trains_to_the_same_loss_and_adapters(dp):
    loss, state = _trained(False, dp)
    loss_ckpt, state_ckpt = _trained(True, dp)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name, t in state.items():
        torch.testing.assert_close(state_ckpt[name], t, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_switches_off_again():
    net = make_tiny_bert(dropout=0.0)
    set_gradient_checkpointing(net, True)
    set_gradient_checkpointing(net, False)
    assert not net.is_activation_checkpointing and not getattr(net, "_require_grads_hooks", [])


def test_a_deployed_agent_quantizes_by_its_own_choice_not_the_coordinators(tmp_path):
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from fedlora.client.handler import local_setup
    from fedlora.deploy.agent import node_config
    from fedlora.flower.messages import RunFacts
    from fedlora.io.agent_state import AgentPrivacy

    data = tmp_path / "mine.csv"
    data.write_text("text,label\nshares rose,business\nthe match,sports\n")
    mine = node_config(data, None, "cpu", AgentPrivacy(), tmp_path / "s", quantize="8bit")
    assert mine.endswith("device='cpu'")  # still last: Flower reads a value ending in .toml as a file
    node = parse_config_args([mine])
    assert node["quantize"] == "8bit" and "quantize" not in parse_config_args(
        [node_config(data, None, "cpu", AgentPrivacy(), tmp_path)]
    )
    facts = RunFacts(labels=("business", "sports"))
    for config, kind in ((node, "8bit"), ({k: v for k, v in node.items() if k != "quantize"}, "none")):
        context = Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})
        assert local_setup(RunConfig(quantize="4bit"), facts, context).quantize == kind
