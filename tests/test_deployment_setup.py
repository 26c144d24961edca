"""Deployment pieces that need no network: certificates, flag checks, node config,
partition files and a deployed client's view of its own data."""

import json

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

from fedlora.cli import main
from fedlora.client.handler import Declined, check_task, local_setup, pick_device
from fedlora.config import RunConfig
from fedlora.deploy.agent import check_agent, node_config
from fedlora.deploy.certs import write_certificates
from fedlora.deploy.coordinator import check_deployment
from fedlora.deploy.processes import parse_address
from fedlora.errors import UserError
from fedlora.flower.messages import RunFacts
from fedlora.io.agent_state import AgentPrivacy, rows_digest
from fedlora.io.agent_task import AgentTask
from fedlora.ml.data import TextDataset, align_labels
from fedlora.ml.task import load_splits, write_partitions


def test_certificates_chain_to_the_ca_and_name_the_host(tmp_path):
    write_certificates(tmp_path, "coord.example.org", clients=2)
    coord = tmp_path / "coordinator"
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((coord / "server.pem").read_bytes())
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(), server.signature_hash_algorithm
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coord.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for i in (1, 2):
        client = tmp_path / "clients" / f"client-{i}"
        key = serialization.load_ssh_private_key((client / "client.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = (coord / "auth-keys" / f"client-{i}.pub").read_bytes().strip()
        assert public == key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        assert (client / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()


def test_each_machine_gets_its_own_private_folder_and_nothing_is_overwritten(tmp_path):
    write_certificates(tmp_path, "localhost", clients=1)
    coordinator = {p.relative_to(tmp_path / "coordinator").as_posix() for p in (tmp_path / "coordinator").rglob("*")}
    assert coordinator == {
        "ca.crt",
        "server.pem",
        "server.key",
        "auth-keys",
        "auth-keys/client-1.pub",
    }  # no CA key, no client key
    for folder in ("ca", "coordinator", "coordinator/auth-keys", "clients", "clients/client-1"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o700
    for key in ("ca/ca.key", "coordinator/server.key", "clients/client-1/client.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(UserError, match="not empty"):
        write_certificates(tmp_path, "localhost", clients=1)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before
    write_certificates(tmp_path, "localhost", clients=1, overwrite=True)
    assert (tmp_path / "ca" / "ca.key").read_bytes() != before


def test_deployment_flags_are_checked_before_anything_starts(tmp_path):
    assert parse_address("0.0.0.0:9092") == ("0.0.0.0", 9092)
    for bad in ("9092", "host:", "host:http", "host:70000"):
        with pytest.raises(UserError, match="HOST:PORT"):
            parse_address(bad)
    with pytest.raises(UserError, match="--tls-dir DIR .* or --insecure"):
        check_deployment("127.0.0.1:9092", None, False, None)
    with pytest.raises(UserError, match="lacks ca.crt, server.pem, server.key"):
        check_deployment("127.0.0.1:9092", str(tmp_path), False, None)
    with pytest.raises(UserError, match="needs TLS"):
        check_deployment("127.0.0.1:9092", None, True, str(tmp_path))
    write_certificates(tmp_path / "c", "localhost", clients=0)
    coord = tmp_path / "c" / "coordinator"
    with pytest.raises(UserError, match="no \\*.pub"):
        check_deployment("127.0.0.1:9092", str(coord), False, str(coord / "auth-keys"))
    dep = check_deployment("127.0.0.1:9092", str(coord), False, None)
    assert dep.tls_dir == coord.resolve() and dep.auth_keys == []


def test_agent_flags_and_data_are_checked_before_connecting(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    ok = dict(
        coordinator="127.0.0.1:9092",
        data=str(data),
        rank=None,
        device="cpu",
        dp_epsilon=None,
        root_cert=None,
        insecure=True,
        auth_key=None,
    )
    task, count, digest = check_agent(**ok)
    assert task == AgentTask(labels=("x",)) and count == 1  # without --labels it declares its file's
    assert digest == rows_digest([("a", "x")])
    cases = [
        ({"insecure": False}, "--root-cert FILE .* or --insecure"),
        ({"insecure": False, "root_cert": str(tmp_path / "none.crt")}, "no such file"),
        ({"auth_key": str(data)}, "needs TLS"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"dp_epsilon": -1.0}, "dp-epsilon must be > 0"),
        ({"device": "tpu"}, "unknown device"),
        ({"data": str(tmp_path / "missing.jsonl")}, "not found|no such|does not exist"),
        ({"coordinator": "nowhere"}, "HOST:PORT"),
        ({"task": AgentTask(text_column="body")}, "column 'body' not in"),
        ({"task": AgentTask(labels=("x", "x"))}, "--labels names a label twice"),
        ({"task": AgentTask(labels=("y", "z"))}, "--labels lacks 1 label"),
        ({"task": AgentTask(task="tabular")}, "unknown task"),
        ({"task": AgentTask(task="causal-lm", labels=("x",))}, "--labels is for --task classify"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "CUDA is not available"))
    for change, message in cases:
        with pytest.raises(UserError, match=message):
            check_agent(**{**ok, **change})


def test_node_config_survives_flowers_parser(tmp_path):
    data = tmp_path / "a folder" / 'x"y.jsonl'
    own = AgentPrivacy(epsilon=8.0, delta=1e-6, clip=0.5, max_steps=400)
    task = AgentTask(text_column="it's", labels=("it's", 'say "hi"', "a b=c", "ünï", "x\ny"))
    parsed = parse_config_args([node_config(data, 4, "auto", own, tmp_path / "state.toml", 120, "ab" * 32, task=task)])
    assert AgentTask.from_node(parsed) == task and AgentTask.from_node({}) == AgentTask()
    del parsed["agent-task"]
    assert parsed == {
        "data-path": str(data),
        "state-dir": str(tmp_path / "state.toml"),
        "num-examples": 120,
        "rank": 4,
        "dp-epsilon": 8.0,
        "dp-delta": 1e-6,
        "dp-clip": 0.5,
        "dp-max-steps": 400,
        "data-digest": "ab" * 32,
        "device": "auto",
    }
    assert AgentPrivacy.from_node(parsed) == own
    plain = parse_config_args([node_config(data, None, "cpu", AgentPrivacy(), tmp_path)])
    del plain["agent-task"]
    assert AgentPrivacy.from_node(plain) == AgentPrivacy() and "rank" not in plain and "dp-epsilon" not in plain
    with pytest.raises(UserError, match="cannot be passed"):
        node_config(tmp_path / "it's.jsonl", None, "cpu", AgentPrivacy(), tmp_path)


def test_partition_files_cover_the_training_split_only(tmp_path):
    cfg = RunConfig(clients=3)
    paths = write_partitions(cfg, tmp_path)
    assert [p.name for p in paths] == ["client-1.jsonl", "client-2.jsonl", "client-3.jsonl"]
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    splits = load_splits(cfg)
    assert len(rows) == len(splits.train)
    assert sorted(r["text"] for r in rows) == sorted(splits.train.texts)  # the held-out rows are in no file
    assert {r["label"] for r in rows} == set(splits.label_names)


def test_labels_are_matched_by_name():
    local = TextDataset(["a", "b", "c"], [0, 1, 0], ["sports", "business"])
    aligned = align_labels(local, ["business", "politics", "sports"])
    assert aligned.labels == [2, 0, 2] and aligned.label_names == ["business", "politics", "sports"]
    with pytest.raises(UserError, match="not in the federation's label set"):
        align_labels(TextDataset(["a"], [0], ["weather"]), ["business", "sports"])


def test_a_deployed_client_reads_its_own_file(tmp_path):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\nshares rose,business\nthe match,sports\n")
    cfg = RunConfig(dp_epsilon=3.0, rank=8)
    facts = RunFacts(labels=("business", "politics", "sports"))
    node = {
        "data-path": str(data),
        "rank": 4,
        "device": "cpu",
        "dp-epsilon": 1.5,
        "state-dir": str(tmp_path / "s"),
        "data-digest": rows_digest([("the match", "sports"), ("shares rose", "business")]),
    }
    setup = local_setup(cfg, facts, Context(run_id=1, node_id=77, node_config=node, state=RecordDict(), run_config={}))
    assert setup.data.texts == ["shares rose", "the match"] and setup.data.labels == [0, 2]
    assert (setup.rank, setup.num_labels, setup.dp_epsilon, setup.index) == (4, 3, 1.5, 77)
    assert setup.ledger.path == tmp_path / "s" / "ledgers" / f"{node['data-digest']}.json" and not setup.simulated
    assert setup.dp_delta == 1e-5 and setup.held_file == tmp_path / "s" / "runs" / "1" / "held.bin"
    assert setup.device == torch.device("cpu")
    with pytest.raises(Declined, match="no-labels"):
        check_task(RunConfig(), RunFacts(), AgentTask(labels=("business", "sports")))
    assert pick_device("auto").type in ("cpu", "cuda")


def test_a_deployed_causal_lm_client_reads_prompt_response_pairs(tmp_path, capsys):
    from fedlora.deploy.agent import check_agent

    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "What is 1 plus 2?", "answer": "#### 3"}\n')
    cfg = RunConfig()
    cfg.update({"task": "causal-lm"})
    node = {"data-path": str(data), "device": "cpu", **parse_config_args([AgentTask("causal-lm").node_config()])}
    setup = local_setup(
        cfg, RunFacts(), Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    )
    assert setup.data.prompts == ["What is 1 plus 2?"] and setup.data.responses == ["#### 3"] and setup.num_labels == 0
    check_agent("127.0.0.1:9092", str(data), None, "cpu", None, None, True, None, AgentTask("causal-lm"))
    assert "1 prompt/response pairs" in capsys.readouterr().out
    with pytest.raises(UserError, match="column 'text' not in"):
        check_agent("127.0.0.1:9092", str(data), None, "cpu", None, None, True, None, AgentTask())


def test_cli_deployment_errors_are_one_line(capsys):
    assert main(["coordinator", "--address", "nowhere", "--insecure"]) == 2
    assert main(["coordinator", "--address", "127.0.0.1:9092"]) == 2
    assert main(["coordinator", "--address", "127.0.0.1:9092", "--insecure", "--resume"]) == 2
    assert main(["client", "--coordinator", "127.0.0.1:9092", "--data", "missing.jsonl", "--insecure"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("fedlora: error:") for line in lines)


class FakeFlowerCli:
    """The SuperLink's key registry as ``flwr supernode register/unregister/list`` sees it: a
    key it has seen is never taken again, an unregistered node stays listed as such."""

    def __init__(self):
        self.registered: dict[int, str] = {}  # live nodes
        self.unregistered: dict[int, str] = {}

    def call(self, *args):
        if args[:2] == ("supernode", "register"):
            key = open(args[2]).read()
            if key in self.registered.values() or key in self.unregistered.values():
                raise UserError("flwr supernode register: Public key already in use")
            node = 100 + (len(self.registered) + len(self.unregistered)) * 7
            self.registered[node] = key
            return {"success": True, "node-id": node}
        if args[:2] == ("supernode", "unregister"):
            self.unregistered[int(args[2])] = self.registered.pop(int(args[2]))
            return {"success": True}
        if args[:2] == ("supernode", "list"):
            nodes = [{"node-id": str(n), "status": "online"} for n in self.registered]
            nodes += [{"node-id": str(n), "status": "unregistered"} for n in self.unregistered]
            return {"success": True, "nodes": nodes}
        raise AssertionError(args)


def test_registered_keys_follow_auth_keys_exactly_across_a_resume(tmp_path):
    from fedlora.deploy.coordinator import sync_registered_keys

    write_certificates(tmp_path / "c", "localhost", clients=3)
    keys = sorted((tmp_path / "c" / "coordinator" / "auth-keys").glob("*.pub"))
    cli, registry = FakeFlowerCli(), tmp_path / "registered.json"
    sync_registered_keys(cli, keys, registry)
    assert sorted(cli.registered.values()) == sorted(k.read_text() for k in keys)
    sync_registered_keys(cli, keys, registry)  # a resume with the same keys: nothing changes
    assert len(cli.registered) == 3
    sync_registered_keys(cli, keys[:2], registry)  # client-3's key removed from --auth-keys
    assert sorted(cli.registered.values()) == sorted(k.read_text() for k in keys[:2])
    registry.unlink()  # a registration this run has no record of cannot be reconciled: refused
    with pytest.raises(UserError, match="not by this run's record"):
        sync_registered_keys(cli, keys[:2], registry)


def test_every_node_the_superlink_knows_outside_auth_keys_is_unregistered(tmp_path):
    """Keys registered outside this run's record (another tool, a record lost or edited) go
    too: after a sync, the SuperLink lets in the nodes of --auth-keys and no others."""
    from fedlora.deploy.coordinator import sync_registered_keys

    write_certificates(tmp_path / "c", "localhost", clients=3)
    keys = sorted((tmp_path / "c" / "coordinator" / "auth-keys").glob("*.pub"))
    cli, registry = FakeFlowerCli(), tmp_path / "registered.json"
    cli.call("supernode", "register", str(keys[2]))  # unknown to registered.json
    sync_registered_keys(cli, keys[:2], registry)
    assert sorted(cli.registered.values()) == sorted(k.read_text() for k in keys[:2])
    assert list(cli.unregistered.values()) == [keys[2].read_text()]
    stranger = next(n for n in cli.registered if cli.registered[n] == keys[1].read_text())
    registry.write_text(json.dumps({k: v for k, v in json.loads(registry.read_text()).items() if v != stranger}))
    with pytest.raises(UserError, match="never registers a key twice"):  # its record edited away: it goes
        sync_registered_keys(cli, keys[:2], registry)
    assert list(cli.registered.values()) == [keys[0].read_text()]


def test_a_resume_may_not_weaken_tls_or_node_authentication(tmp_path):
    from fedlora.deploy.coordinator import Deployment, check_security_mode

    secure = Deployment("127.0.0.1:9092", tmp_path, [tmp_path / "k.pub"])
    check_security_mode(tmp_path, secure, resume=False)
    with pytest.raises(UserError, match="resume it with --auth-keys"):
        check_security_mode(tmp_path, Deployment("127.0.0.1:9092", tmp_path, []), resume=True)
    with pytest.raises(UserError, match="not --insecure"):
        check_security_mode(tmp_path, Deployment("127.0.0.1:9092", None, []), resume=True)
    check_security_mode(tmp_path, secure, resume=True)
    check_security_mode(tmp_path, Deployment("127.0.0.1:9092", None, []), resume=False)  # a fresh run chooses afresh


def test_a_resume_without_the_security_record_is_refused(tmp_path):
    """A run folder whose deployment.json is gone cannot tell how the run was secured: even a
    resume as strong as can be is refused, rather than letting a weaker one through."""
    from fedlora.deploy.coordinator import SECURITY_RECORD, Deployment, check_security_mode

    secure = Deployment("127.0.0.1:9092", tmp_path, [tmp_path / "k.pub"])
    check_security_mode(tmp_path, secure, resume=False)
    (tmp_path / SECURITY_RECORD).unlink()
    for dep in (Deployment("127.0.0.1:9092", None, []), secure):
        with pytest.raises(UserError, match=f"no {SECURITY_RECORD}") as refused:
            check_security_mode(tmp_path, dep, resume=True)
        assert "\n" not in str(refused.value)
    assert not (tmp_path / SECURITY_RECORD).exists()  # nothing written for a refused resume
