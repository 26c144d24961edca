"""fedlora as a Flower App: pyproject.toml's [tool.flwr.app] is what `flwr run .` reads."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from deployment_helpers import connect_as_another_user, listening_ports
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.object_ref import load_app

from fedlora.config import RunConfig
from fedlora.config.run_config import BY_NAME, CAUSAL_LM_DEFAULTS
from fedlora.deploy.local_api import SOCKET_NAME, wait_for_socket
from fedlora.deploy.processes import free_loopback_port, wait_for_port
from fedlora.deploy.trusted_app import TRUSTED_CLIENTAPP, check_bundle
from fedlora.errors import UserError
from fedlora.server.app import RUN_KEYS, run_folder, run_settings

ROOT = Path(__file__).resolve().parents[1]


def app_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]


def test_flower_loads_the_app_from_pyproject():
    """Flower's own validation (components importable, config well formed), then its loader."""
    config, warnings = load_and_validate(ROOT / "pyproject.toml")
    assert warnings == []
    components = config["tool"]["flwr"]["app"]["components"]
    assert isinstance(load_app(components["serverapp"], ValueError, ROOT), ServerApp)
    assert isinstance(load_app(components["clientapp"], ValueError, ROOT), ClientApp)
    assert components["clientapp"] == TRUSTED_CLIENTAPP
    # federations are Flower's own config since 1.39: `flwr run` would move them out of this
    # file and rewrite it
    assert "federations" not in config["tool"]["flwr"]


def test_the_run_config_keys_are_settings_with_their_defaults():
    """Every key is a setting (or one of the ServerApp's own keys); a value that is given is
    the schema's default, and none of them has a different causal-LM or per-strategy default."""
    config = app_table()["config"]
    defaults = RunConfig()
    for key, value in config.items():
        if key in RUN_KEYS:
            continue
        name = key.replace("-", "_")
        assert name in BY_NAME, key
        if value != "":
            assert getattr(defaults, name) == value, key
            assert name not in CAUSAL_LM_DEFAULTS, key
            assert not BY_NAME[name].by_strategy, key  # a given value would hide a strategy's own default
    assert run_settings(config).to_dict() == defaults.to_dict()
    assert set(RUN_KEYS) <= set(config)


def test_run_config_overrides_reach_the_settings():
    config = {**app_table()["config"], "rounds": 2, "strategy": "fedsb", "dp-epsilon": 8, "lr": 0.01}
    cfg = run_settings(config)
    assert (cfg.rounds, cfg.strategy, cfg.dp_epsilon, cfg.lr) == (2, "fedsb", 8.0, 0.01)
    # fedlora simulate and coordinator send every setting as JSON; a key of its own overrides it
    cfg = run_settings({"fedlora-config": '{"rounds": 3, "clients": 2}', "rounds": 4})
    assert (cfg.rounds, cfg.clients) == (4, 2)
    with pytest.raises(UserError, match="unknown config key"):
        run_settings({"round": 2})
    with pytest.raises(UserError):
        run_settings({"rounds": 0})


def test_the_run_folder(tmp_path):
    cfg = RunConfig(strategy="ffa")
    assert run_folder({"out-dir": "x/y"}, cfg, tmp_path) == tmp_path / "x" / "y"
    assert run_folder({"out-dir": "."}, cfg, tmp_path) == tmp_path  # fedlora coordinator's own run
    default = run_folder({"out-dir": ""}, cfg, tmp_path)
    assert default.parent == tmp_path / "runs" and default.name.endswith("-ffa")


def test_the_checkouts_bundle_carries_no_code_and_an_agent_accepts_it():
    """`flwr run .` builds a bundle of pyproject.toml alone (fab-include): every machine runs
    the fedlora it installed, and an agent, whose environment satisfies fedlora's
    dependencies, accepts it."""
    fab = build_fab_from_disk(ROOT)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        assert [n for n in archive.namelist() if not n.startswith(".info/")] == ["pyproject.toml"]
    check_bundle(fab)


@pytest.mark.slow
def test_flwr_run_in_a_checkout_writes_a_run_folder(tmp_path):
    """`flwr run .` against a SuperLink in simulation mode (what Flower's `local` connection
    starts), one short round with two SuperNodes: the same run folder as `fedlora simulate`,
    at an out-dir relative to where the SuperLink works."""
    out, port = tmp_path / "run", free_loopback_port()
    env = flower_home(tmp_path, port, f'[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true')
    cmd = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    cmd.append("--disable-runtime-dependency-installation")  # use this environment, install nothing
    with (tmp_path / "superlink.log").open("wb") as log:
        superlink = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
    try:
        wait_for_port("127.0.0.1", port, superlink, 300, "the SuperLink")
        small = json.dumps({"local_steps": 1, "batch_size": 8, "max_length": 32, "eval_max_examples": 32})
        run_config = f"rounds=1 clients=2 out-dir='run' fedlora-config='{small}'"
        federation = ("--federation-config", "num-supernodes=2 client-resources-num-cpus=1")
        flwr_run_to_the_end(env, tmp_path, "sim", run_config, *federation, timeout_s=600)
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoint.safetensors",
        "summary.json",
        "adapter/adapter_config.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["num_clients"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def flower_home(tmp_path: Path, port: int, connection: str) -> dict[str, str]:
    """A Flower config with one SuperLink connection, and the environment that uses it."""
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection.split()[0]}"\n\n{connection}\n')
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def flwr_run_to_the_end(
    env: dict[str, str],
    cwd: Path,
    connection: str,
    run_config: str,
    *extra: str,
    timeout_s: int,
    flwr: Path | None = None,
):
    """`flwr run` of this checkout on ``connection``, streamed: it succeeds and shows the
    ServerApp's last progress line. ``flwr``: a serving coordinator's launcher, else Flower's own."""
    proc = subprocess.run(
        [str(flwr or Path(sys.executable).parent / "flwr"), "run", str(ROOT), connection, "--stream"]
        + ["--run-config", run_config, *extra],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run finished: final accuracy" in proc.stdout  # the ServerApp's progress, streamed


def stop_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """`fedlora coordinator --serve` (no job of its own), shared by the tests below; SIGTERM
    then stops it and everything it started, cleanly."""
    tmp = tmp_path_factory.mktemp("serving")
    log, served, fleet = tmp / "coordinator.txt", tmp / "fed", free_loopback_port()
    cmd = [sys.executable, "-m", "fedlora.cli", "coordinator", "--serve", "--insecure"]
    cmd += ["--address", f"127.0.0.1:{fleet}", "--out", str(served)]
    with log.open("wb") as fh:
        coordinator = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_socket(served / ".flower" / SOCKET_NAME, coordinator, 300, "the serving coordinator")  # a busy machine
        wait_for_port("127.0.0.1", fleet, coordinator, 300, "the serving coordinator's Fleet API")  # binds later
        yield SimpleNamespace(
            proc=coordinator, tmp=tmp, served=served, fleet=fleet, flwr=served / ".flower" / "bin" / "flwr"
        )
    finally:
        stop_group(coordinator)
    text = log.read_text()
    assert "Traceback" not in text and coordinator.returncode == 0, text


def test_a_serving_coordinator_takes_flwr_run_through_the_launcher_it_prints(serving):
    """Flower's CLI reaches the control API through the launcher the coordinator printed."""
    proc = subprocess.run([str(serving.flwr), "ls", "--format", "json"], capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout[proc.stdout.index("{") :])["success"], proc.stdout
    text = (serving.tmp / "coordinator.txt").read_text()
    assert f"submit one with: {serving.flwr} run ." in text and str(serving.served / "runs") in text, text


@pytest.mark.slow
def test_no_loopback_port_but_the_fleet_api_and_a_socket_only_the_operator_opens(serving):
    """The control and runtime APIs listen on a Unix socket (0600, in a 0700 folder), not on
    TCP: the coordinator's processes listen on the Fleet API's port and nothing else."""
    assert listening_ports(serving.proc.pid) == {serving.fleet}
    flower = serving.served / ".flower"
    assert (flower / SOCKET_NAME).stat().st_mode & 0o777 == 0o600
    for folder in (flower, flower / "bin"):
        assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.slow
def test_another_user_cannot_open_the_api_socket(serving):
    """Another OS user (a uid of its own, dropped to in a child process) is refused at the
    socket's folder; in a folder open to all, the same child connects (the check is real)."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root; the port check above still holds")
    open_folder = serving.tmp / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with socket.socket(socket.AF_UNIX) as control:
        control.bind(str(open_folder / "s.sock"))
        (open_folder / "s.sock").chmod(0o777)
        control.listen()
        assert connect_as_another_user(open_folder, "s.sock") == "connected"
    assert connect_as_another_user(serving.served, f".flower/{SOCKET_NAME}") == "Permission denied"


@pytest.mark.slow
def test_a_bundle_whose_serverapp_writes_a_file_is_refused_in_one_line(serving):
    """The review's attack, by the operator this time (no one else reaches the API): a bundle
    that carries its own ServerApp is refused when submitted, and its code never runs."""
    app, marker = serving.tmp / "foreign-app", serving.tmp / "written-by-the-foreign-serverapp"
    write_foreign_app(app, marker)
    cmd = [str(serving.flwr), "run", str(app), "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    answer = json.loads(proc.stdout[proc.stdout.index("{") :])
    refusals = [line for line in answer["error-message"].splitlines() if "refused" in line]
    assert not answer["success"] and len(refusals) == 1, answer  # after any warnings of Flower's own
    assert "only fedlora's own ServerApp" in refusals[0] and "foreign.py" in refusals[0]
    runs = subprocess.run([str(serving.flwr), "ls", "--format", "json"], capture_output=True, text=True)
    assert json.loads(runs.stdout[runs.stdout.index("{") :])["runs"] == []  # nothing stored, nothing started
    time.sleep(2)
    assert not marker.exists()


def write_foreign_app(folder: Path, marker: Path) -> None:
    """A Flower app whose ServerApp writes ``marker`` (at import, and when it runs)."""
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "foreign"\nversion = "1.0.0"\ndescription = "x"\nlicense = "Apache-2.0"\n'
        'dependencies = []\n\n[tool.flwr.app]\npublisher = "someone"\n\n[tool.flwr.app.components]\n'
        'serverapp = "foreign:app"\nclientapp = "fedlora.client.app:app"\n\n[tool.flwr.app.config]\n'
    )
    (folder / "foreign.py").write_text(
        f"from pathlib import Path\nfrom flwr.serverapp import ServerApp\nPath({str(marker)!r}).write_text('import')\n"
        f"app = ServerApp()\n\n@app.main()\ndef main(grid, context):\n    Path({str(marker)!r}).write_text('run')\n"
    )


@pytest.mark.slow
def test_flwr_run_against_a_serving_coordinator_trains_its_agents_and_tracks(tmp_path):
    """The deployment path of `flwr run .`: a serving coordinator over TLS with node
    authentication and the operator's --track (kept off the run config), two agents that
    run only the bundle they trust, and a run submitted from the checkout, through the
    coordinator's launcher, that writes its folder under the coordinator's --out."""
    from deployment_helpers import fedlora, prepare, stop_all

    certs, parts, _, address = prepare(tmp_path, keys=2, partitions=2)
    served = tmp_path / "fed"
    coordinator = fedlora(
        *("coordinator", "--serve", "--address", address, "--out", str(served)),
        *("--tls-dir", str(certs / "coordinator"), "--auth-keys", str(certs / "coordinator" / "auth-keys")),
        *("--track", "tensorboard"),
        log=tmp_path / "coordinator.out",
    )
    procs = [coordinator]
    try:
        wait_for_socket(served / ".flower" / SOCKET_NAME, coordinator, 300, "the serving coordinator")
        for i in (1, 2):
            agent = ("client", "--coordinator", address, "--data", str(parts / f"client-{i}.jsonl"))
            agent += (
                "--root-cert",
                str(certs / "ca" / "ca.crt"),
                "--auth-key",
                str(certs / "clients" / f"client-{i}" / "client.key"),
            )
            procs.append(fedlora(*agent, "--state-dir", str(tmp_path / f"agent-{i}"), log=tmp_path / f"agent-{i}.out"))
        env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        small = json.dumps(
            {"local_steps": 2, "batch_size": 8, "max_length": 32, "eval_max_examples": 40, "init_batches": 1}
        )
        run_config = f"strategy='fedsb' rounds=2 clients=2 fedlora-config='{small}'"
        launcher = served / ".flower" / "bin" / "flwr"  # its connection: the socket, the coordinator's CA
        flwr_run_to_the_end(env, tmp_path, "local", run_config, timeout_s=900, flwr=launcher)
    finally:
        stop_all(procs, tmp_path)
    (run,) = (served / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 2 and summary["strategy"] == "fedsb"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # the coordinator's --track held
    for name in ("coordinator", "agent-1", "agent-2"):
        text = (tmp_path / f"{name}.out").read_text()
        assert "Traceback" not in text, text
