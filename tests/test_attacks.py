"""One hostile client against the coordinator's bridge, for every simulated attack kind
(fedlora.flower.attacks), with the default defences; each attack also runs undefended to show
that the assertion can fail. Then the decoder and reply-handling cases that used to crash
or fool the coordinator. The bounded attacks (``steer``, ``sketch-capture``) are checked for
what they promise: a well-formed payload just under the bound they can estimate, and
undefended, the aggregate theirs."""

import json
import logging
from dataclasses import replace

import pytest
import torch
from flwr.app import Context, RecordDict
from replies import FakeReply
from safetensors.torch import load_file

from fedlora.client.handler import train
from fedlora.config import RunConfig
from fedlora.flower.attacks import MARGIN, STEER_CLASS, attack_mod, attacked_payload, capture_sketch
from fedlora.flower.bridge import FlowerStrategy
from fedlora.flower.messages import RECORD, RunFacts
from fedlora.io import wire
from fedlora.io.schema import update_pb2 as pb
from fedlora.ml.adapters import LoRASpec
from fedlora.ml.task import initial_adapter_state, lora_spec
from fedlora.strategies import make_strategy
from fedlora.strategies.base import lora_deltas, merged_deltas
from fedlora.strategies.fedsb import GRAD_U, GRAD_V

SPEC = LoRASpec(rank=2, alpha=4.0, target_modules=("q",))
A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "classifier.weight"
DEFAULTS = RunConfig()
SIZES = (100, 120, 90)  # the honest clients' data sizes; the attacker is client 4 with 100


def initial_state() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {A: torch.randn(2, 5, generator=gen), B: torch.zeros(6, 2), HEAD: torch.zeros(3, 6)}


def bridge(name: str, defended: bool = True, **kw) -> FlowerStrategy:
    strategy = make_strategy(name, SPEC)
    defences = (
        dict(
            robust_multiple=DEFAULTS.robust_norm_multiple,
            robust_mode=DEFAULTS.robust_mode,
            robust_max_norm=DEFAULTS.robust_max_norm,
            weight_cap=DEFAULTS.robust_weight_cap,
        )
        if defended
        else {}
    )
    return FlowerStrategy(strategy, strategy.setup(initial_state()), "{}", **defences, **kw)


def honest_states(b: FlowerStrategy, seed: int = 1) -> list[dict]:
    """Four honest updates: a shared direction plus each client's own noise."""
    gen = torch.Generator().manual_seed(seed)
    expected = b.strategy.expected_update_shapes(b.global_state)
    shapes = {n: tuple(SPEC.rank if d is None else d for d in s) for n, s in expected.items()}
    common = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    out = []
    for _ in range(4):
        state = {}
        for n, s in shapes.items():
            base = b.global_state.get(n, torch.zeros(s))
            state[n] = base + 0.1 * (common[n] + 0.5 * torch.randn(s, generator=gen))
        out.append(state)
    return out


def blob(b: FlowerStrategy, state: dict, n: int, kind: str = "update") -> bytes:
    return wire.encode(state, kind=kind, strategy=b.strategy.name, round_num=0 if kind == "init" else 1, num_examples=n)


def attack_cfg(kind: str, scale: float = 20.0, **kw) -> RunConfig:
    return replace(RunConfig(), attack_clients=(3,), attack_kind=kind, attack_scale=scale, lora_alpha=SPEC.alpha, **kw)


def run_round(b: FlowerStrategy, states: list[dict], attacker: bytes | None) -> None:
    replies = [FakeReply(i + 1, blob(b, s, n)) for i, (s, n) in enumerate(zip(states, SIZES))]
    replies.append(FakeReply(4, attacker if attacker is not None else blob(b, states[3], 100)))
    b.aggregate_train(1, replies)


def global_change(b: FlowerStrategy, before: dict) -> float:
    return b.strategy.effect_norm(
        before, {n: t for n, t in b.global_state.items() if n not in before or not torch.equal(t, before[n])}
    )


def test_scale_is_clipped_to_the_round_bound():
    changes = {}
    for defended in (True, False):
        clean = bridge("fedavg", defended)
        states = honest_states(clean)
        before = dict(clean.global_state)
        run_round(clean, states, None)
        attacked = bridge("fedavg", defended)
        run_round(attacked, states, attacked_payload(attack_cfg("scale"), blob(attacked, states[3], 100), before))
        changes[defended] = global_change(attacked, before) / global_change(clean, before)
        if defended:
            assert attacked.stats.clipped == 1 and attacked.stats.clients == 4
    assert changes[True] < 2.0 and changes[False] > 4.0


def test_a_claimed_size_weighs_at_most_the_cap():
    weights = {}
    for defended in (True, False):
        b = bridge("ffa", defended)
        states = [{B: torch.full((6, 2), float(v)), HEAD: torch.zeros(3, 6)} for v in (1, 1, 1, 0)]
        payload = attacked_payload(attack_cfg("claim-examples"), blob(b, states[3], 100), b.global_state)
        run_round(b, states, payload)
        weights[defended] = 1.0 - float(b.global_state[B][0, 0])  # the attacker's share: its B is 0, the others' 1
    median = sorted([*SIZES, wire.MAX_EXAMPLES])[1]
    cap = DEFAULTS.robust_weight_cap * median
    assert weights[True] == pytest.approx(cap / (sum(min(n, cap) for n in SIZES) + cap), rel=1e-5)
    assert weights[False] > 0.999


def test_a_rank1_flora_client_is_measured_by_its_effect():
    changes = {}
    for defended in (True, False):
        clean = bridge("flora", defended)
        states = honest_states(clean)
        run_round(clean, states, None)
        attacked = bridge("flora", defended)
        payload = attacked_payload(attack_cfg("flora-rank1", 200.0), blob(attacked, states[3], 100), {})
        assert wire.decode(payload).tensors[A].shape[0] == 1
        run_round(attacked, states, payload)
        changes[defended] = float(
            merged_deltas(attacked.global_state)["m.q"].norm() / merged_deltas(clean.global_state)["m.q"].norm()
        )
        if defended:
            assert attacked.stats.clipped == 1
    assert changes[True] < 2.5 and changes[False] > 20.0  # bounded whatever the scale


def fedsb_init(defended: bool, attack: str | None, scale: float = 1e12, sent: list | None = None) -> FlowerStrategy:
    b = bridge("fedsb", defended)
    b.init_stats = type(b.stats)(sampled=[1, 2, 3, 4])
    gen = torch.Generator().manual_seed(2)
    common = torch.randn(6, 5, generator=gen)
    replies = []
    for i, n in enumerate((*SIZES, 100)):
        payload = blob(
            b, b.strategy.init_reply({"m.q": common + 0.3 * torch.randn(6, 5, generator=gen)}), n, kind="init"
        )
        if i == 3 and attack is not None:
            payload = attacked_payload(attack_cfg(attack, scale), payload, {})
            if sent is not None:
                sent.append(wire.decode(payload).tensors)
        replies.append(FakeReply(i + 1, payload))
    if attack == "skewed":  # a sketch whose V is not orthonormal
        bad = wire.decode(replies[3].content["fedlora"]["payload"]).tensors
        bad[f"m.q{GRAD_V}"] = bad[f"m.q{GRAD_V}"] * 2
        replies[3] = FakeReply(4, blob(b, bad, 100, kind="init"))
    assert b.aggregate_init(replies)
    return b


def test_an_inflated_initialisation_sketch_is_bounded():
    def r0(b):
        return float(b.global_state["m.q.lora_R.weight"].norm())

    clean, defended, undefended = (
        fedsb_init(True, None),
        fedsb_init(True, "init-sketch"),
        fedsb_init(False, "init-sketch"),
    )
    assert defended.init_stats.clipped == 1 and r0(defended) < 3 * r0(clean)
    assert r0(undefended) > 1e6 * r0(clean)


def change_vector(before: dict, after: dict) -> torch.Tensor:
    """An update's effect, flattened: each module's dense change, then each head's."""
    dense_before, dense_after = lora_deltas(before, SPEC.alpha), lora_deltas(after, SPEC.alpha)
    parts = [dense_after[m] - dense_before[m] for m in dense_after]
    parts += [after[n].to(torch.float64) - before[n] for n in after if n == HEAD]
    return torch.cat([p.flatten() for p in parts])


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("name", ["fedavg", "ffa"])
@pytest.mark.parametrize("stretch", [0.1, 10.0])
def test_a_steered_update_sits_just_under_the_bound_it_can_estimate(name, stretch):
    cfg = attack_cfg("steer", strategy=name)
    undefended = bridge(name, defended=False)
    before = dict(undefended.global_state)
    states = honest_states(undefended)
    steered = undefended.strategy.shrink(before, honest_states(undefended, seed=7)[0], stretch)
    payload = wire.decode(attacked_payload(cfg, blob(undefended, states[3], 100), before, steered))
    assert payload.num_examples == wire.MAX_EXAMPLES and payload.tensors.keys() == states[3].keys()
    bound = DEFAULTS.robust_norm_multiple * undefended.strategy.effect_norm(before, states[3])
    sent = undefended.strategy.effect_norm(before, payload.tensors)
    assert MARGIN * bound * (1 - 1e-3) <= sent <= bound
    moved = [(payload.tensors[n] - before[n]).flatten() for n in steered]
    wanted = [(steered[n] - before[n]).flatten() for n in steered]
    assert cosine(torch.cat(moved).double(), torch.cat(wanted).double()) > 0.9999  # along the steered change
    encoded = wire.encode_update(payload.tensors, strategy=name, round_num=1, num_examples=payload.num_examples)
    run_round(undefended, states, encoded)
    sent_change = change_vector(before, {**before, **payload.tensors})
    assert cosine(change_vector(before, undefended.global_state), sent_change) > 0.999  # the attacker's aggregate


class Grid:
    def get_node_ids(self):
        return [7]


@pytest.mark.usefixtures("inside_a_flower_run")
def test_the_steer_mod_retrains_on_one_class_and_records_what_it_sent(tmp_path):
    """Through the ClientApp's own handler: a simulated client 0, one small local step."""
    cfg = RunConfig(
        strategy="ffa", attack_clients=(0,), attack_kind="steer", local_steps=1, batch_size=4, max_length=16
    )
    adapter = make_strategy("ffa", lora_spec(cfg))
    state = adapter.setup(initial_adapter_state(cfg.model, 5, adapter.spec, cfg.seed, cfg.task, cfg.pooling))
    facts = RunFacts(("business", "entertainment", "politics", "sports", "tech"), client_state_dir=str(tmp_path))
    coordinator = FlowerStrategy(adapter, state, json.dumps(cfg.to_dict()), run_facts=facts)
    msg = coordinator.configure_train(1, None, None, Grid())[0]

    def client() -> Context:
        return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    honest = wire.decode(train(msg, client()).content[RECORD]["payload"])
    sent = wire.decode(attack_mod(msg, client(), train).content[RECORD]["payload"])
    assert sent.num_examples == wire.MAX_EXAMPLES and sent.tensors.keys() == honest.tensors.keys()
    honest_norm = adapter.effect_norm(state, honest.tensors)
    sent_norm = adapter.effect_norm(state, sent.tensors)
    assert sent_norm == pytest.approx(MARGIN * cfg.robust_norm_multiple * honest_norm, rel=1e-3)
    bias = "classifier.bias"  # every label STEER_CLASS: its logit gains most
    assert int((sent.tensors[bias] - state[bias]).argmax()) == STEER_CLASS
    record = load_file(str(tmp_path / "0" / "attack" / "round-1.safetensors"))
    assert torch.equal(record[f"sent/{bias}"], sent.tensors[bias])
    assert any(n.startswith("global/") and n.endswith("lora_A.weight") for n in record)  # frozen A included


def test_a_steered_update_is_sent_as_trained_with_the_bound_off():
    cfg = attack_cfg("steer", strategy="ffa", robust_norm_multiple=0.0)
    b = bridge("ffa", defended=False)
    states = honest_states(b)
    steered = honest_states(b, seed=7)[0]
    payload = wire.decode(attacked_payload(cfg, blob(b, states[3], 100), b.global_state, steered))
    assert all(torch.equal(payload.tensors[n], steered[n]) for n in steered)


def test_a_capture_sketch_passes_as_a_sketch_orthogonal_to_the_honest_one():
    b = bridge("fedsb")
    honest = b.strategy.init_reply({"m.q": torch.randn(6, 5, generator=torch.Generator().manual_seed(3))})
    payload = wire.decode(attacked_payload(attack_cfg("sketch-capture"), blob(b, honest, 100, kind="init"), {}))
    sketch = payload.tensors
    assert payload.num_examples == wire.MAX_EXAMPLES and sketch.keys() == honest.keys()
    b.strategy.check_init(sketch)
    for role in (GRAD_U, GRAD_V):
        ours, theirs = sketch[f"m.q{role}"], honest[f"m.q{role}"]
        assert float((ours.T @ theirs).abs().max()) < 1e-5 * float(ours.norm() * theirs.norm())
    spectrum = torch.linalg.svdvals(sketch[f"m.q{GRAD_U}"])
    assert float(spectrum.max() / spectrum.min()) < 1 + 1e-5  # flat over the r slots
    expected = MARGIN * DEFAULTS.robust_norm_multiple * b.strategy.init_effect_norm(honest)
    assert b.strategy.init_effect_norm(sketch) == pytest.approx(expected, rel=1e-5)


def test_colluders_capture_nearly_the_same_directions():
    gen = torch.Generator().manual_seed(4)
    cfg = attack_cfg("sketch-capture")
    u1, u2 = (
        capture_sketch(cfg, {f"m.q{GRAD_U}": torch.randn(64, 2, generator=gen), f"m.q{GRAD_V}": torch.eye(48)[:, :2]})
        for _ in range(2)
    )
    basis1 = u1[f"m.q{GRAD_U}"] / u1[f"m.q{GRAD_U}"].norm(dim=0)
    basis2 = u2[f"m.q{GRAD_U}"] / u2[f"m.q{GRAD_U}"].norm(dim=0)
    assert float((basis1.T @ basis2).norm() ** 2) / 2 > 0.9


def share_of_b(b: FlowerStrategy, sketch: dict) -> float:
    """||U_attᵀ B||_F² / r: how much of the frozen B's span the attacker's directions hold."""
    u = sketch[f"m.q{GRAD_U}"].to(torch.float64)
    u = u / u.norm(dim=0)
    return float((u.T @ b.global_state["m.q.lora_B.weight"].to(torch.float64)).norm() ** 2) / SPEC.rank


def test_an_undefended_capture_sketch_takes_the_frozen_subspace():
    shares = {}
    for defended in (True, False):
        sent: list = []
        b = fedsb_init(defended, "sketch-capture", sent=sent)
        if not defended:
            assert b.init_stats.rejected == 0  # it passes for a sketch
        shares[defended] = share_of_b(b, sent[0])
    assert shares[False] > 0.99 and shares[True] < shares[False]


def test_a_sketch_that_is_no_svd_is_rejected():
    b = fedsb_init(True, "skewed")
    assert b.init_stats.rejected == 1 and "orthonormal" in b.init_stats.reasons[0]


def test_nan_and_oversized_updates_are_rejected():
    for kind, reason in (("nan", "non-finite"), ("oversized", "exceeds the limit")):
        b = bridge("fedavg", max_update_bytes=1024 * 1024)
        states = honest_states(b)
        run_round(
            b, states, attacked_payload(attack_cfg(kind, max_update_mb=1), blob(b, states[3], 100), b.global_state)
        )
        assert b.stats.rejected == 1 and b.stats.clients == 3 and reason in b.stats.reasons[0]


def test_a_lone_client_is_bounded_too():
    """--fraction picking one client: no median, no reference yet, so the absolute cap."""
    b = bridge("ffa")
    state = {B: torch.full((6, 2), 1e4), HEAD: torch.zeros(3, 6)}
    b.aggregate_train(1, [FakeReply(1, blob(b, state, 100))])
    assert b.stats.clipped == 1
    assert b.strategy.effect_norm(initial_state(), b.global_state) <= DEFAULTS.robust_max_norm * (1 + 1e-5)


# ----- decoder and reply handling: each of these once stopped or fooled the coordinator -----


def raw_payload(*tensors: pb.Tensor, **header) -> bytes:
    msg = pb.Payload(
        schema_version=wire.SCHEMA_VERSION, kind=pb.UPDATE, strategy="fedavg", round=1, num_examples=10, **header
    )
    msg.tensors.extend(tensors)
    return msg.SerializeToString()


def test_an_empty_tensor_with_huge_dimensions_is_rejected_not_allocated():
    huge = pb.Tensor(name=HEAD, role="head", shape=[0, 2**62, 2**62], dtype=pb.FLOAT32, data=b"")
    with pytest.raises(wire.InvalidUpdate, match="invalid shape"):
        wire.decode(raw_payload(huge))
    b = bridge("fedavg")
    states = honest_states(b)
    run_round(b, states, raw_payload(huge))
    assert b.stats.rejected == 1 and b.stats.clients == 3


def test_a_flood_of_tensors_is_rejected_before_any_is_decoded(monkeypatch):
    def flood(count):
        return raw_payload(
            *[
                pb.Tensor(name=f"x{i}.weight", role="head", shape=[1], dtype=pb.FLOAT32, data=b"\0" * 4)
                for i in range(count)
            ]
        )

    def never(_):
        raise AssertionError("a tensor was decoded")

    monkeypatch.setattr(wire, "_decode_tensor", never)
    with pytest.raises(wire.InvalidUpdate, match="tensors exceed the limit"):
        wire.decode_update(flood(wire.MAX_TENSORS + 1), {HEAD: (3, 6)}, strategy="fedavg", round_num=1)
    with pytest.raises(wire.InvalidUpdate, match="unknown tensor name"):
        wire.decode_update(flood(50_000), {HEAD: (3, 6)}, strategy="fedavg", round_num=1)


def test_client_reported_numbers_cannot_overflow_or_lie_about_privacy():
    b = bridge("fedavg")
    states = honest_states(b)
    replies = [
        FakeReply(1, blob(b, states[0], 100), metrics={"train-tokens": 1e308, "epsilon": float("nan")}),
        FakeReply(2, blob(b, states[1], 100), metrics={"train-tokens": 1e308, "epsilon": -3.0}),
        FakeReply(3, blob(b, states[2], 100), metrics={"train-tokens": 50.0, "epsilon": 0.5}),
    ]
    b.aggregate_train(1, replies)
    assert b.stats.clients == 3 and b.stats.train_tokens == 50 and b.worst_epsilon == 0.5
    dp = wire.encode_update(
        states[3], strategy="fedavg", round_num=1, num_examples=10, dp={"epsilon": -1.0, "delta": 1e-5}
    )
    with pytest.raises(wire.InvalidUpdate, match="DP statistic epsilon"):
        wire.decode(dp)


def test_client_text_reaches_the_log_as_one_printable_line(caplog):
    b = bridge("fedavg")
    states = honest_states(b)
    spoof = "\x1b[2J\x1b[32mINFO: all good\nround 9/9 accuracy 1.0" + "x" * 5000
    evil_name = pb.Tensor(name="\x1b[31mevil\n.weight", role="head", shape=[1], dtype=pb.FLOAT32, data=b"\0\0\0\0")
    replies = [
        FakeReply(1, blob(b, states[0], 100)),
        FakeReply(2, declined=spoof),
        FakeReply(3, raw_payload(evil_name)),
        FakeReply(4, error=spoof),
    ]
    with caplog.at_level(logging.INFO, logger="fedlora"):
        b.aggregate_train(1, replies)
    assert b.stats.clients == 1 and b.stats.declined == 1 and b.stats.rejected == 1 and b.stats.failed == 1
    for record in caplog.records:
        line = record.getMessage()
        assert "\x1b" not in line and "\n" not in line and len(line) < 400


class ExplodingReply(FakeReply):
    @property
    def content(self):
        raise RuntimeError("a reply that breaks whatever reads it")

    @content.setter
    def content(self, value):
        pass


def test_any_exception_while_reading_a_reply_rejects_that_reply_only():
    b = bridge("fedavg")
    states = honest_states(b)
    b.aggregate_train(1, [ExplodingReply(1, b""), FakeReply(2, blob(b, states[0], 100))])
    assert b.stats.rejected == 1 and b.stats.clients == 1 and "RuntimeError" in b.stats.reasons[0]
