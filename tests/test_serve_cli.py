"""`bidhive serve` as a user runs it: starts, answers the README's curl order, stops cleanly on SIGTERM or Ctrl-C;
and the same app from `configs/serve.yaml` under Ray Serve's own `serve run`."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from agents.actor import default_state_root
from market.config import CONFIG_DIR, load_fleet
from market.journal import JournalWriter
from runtime.local_ray import is_loopback, listening_addresses
from serve.config import FLEET_DIR_PREFIX
from serve.fleet_state import carry_fleet, fleet_fingerprint
from serve.runner import EXAMPLE_ORDER, spare_port
from tests.factories import held_by_a_connection

BIN = Path(sys.executable).with_name("bidhive")
SERVE_CLI = Path(sys.executable).with_name("serve")  # Ray Serve's own command


def _session_processes(sid: int) -> list[str]:
    """The processes of a session still running. Exited ones (zombies) do not count: they
    hold nothing, and when an orphan is reaped is up to the process that adopted it."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,comm="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid) and not line.split()[2].startswith("Z")]


def _start_serve(tmp: Path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """`bidhive serve ARGS` in a session of its own, Ray's temp files under `tmp`;
    `sigint_ignored` starts it as a script's background job (`cmd &`) is started."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TMPDIR": str(tmp)}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([str(BIN), "serve", *args, "--journal", str(tmp / "j.bhj")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                            preexec_fn=ignore)


def _assert_nothing_left(proc: subprocess.Popen[str], tmp: Path) -> None:
    """No process of the command's session outlives it, and Ray's temp files are gone."""
    end = time.monotonic() + 15
    while _session_processes(proc.pid) and time.monotonic() < end:
        time.sleep(0.5)
    assert _session_processes(proc.pid) == [], "processes of the service outlived it"
    left = sorted(p.name for p in tmp.iterdir())
    assert left[:1] == ["j.bhj"] and set(left) <= {"j.bhj", "j.bhj.fleet"}, f"the embedded Ray left files behind: {left}"


def _until_serving(proc: subprocess.Popen[str]) -> str:
    """What the service printed once it serves, through its "Bidders:" line."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Bidders:"):
            break
    said = "".join(lines)
    assert "bidhive is serving" in said, said
    return said


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh dir with a short path (Ray's socket paths live under it), removed even if the test fails."""
    tmp = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _fleet_dirs() -> set[str]:
    """The bidder fleets' snapshot dirs of every service on this machine."""
    return {p.name for p in Path(default_state_root()).glob(f"{FLEET_DIR_PREFIX}*")}


def _keep_ordering(url: str, clients: int, until: threading.Event) -> list[threading.Thread]:
    """`clients` closed-loop clients placing orders until `until` is set (errors ignored)."""
    def client() -> None:
        with httpx.Client(base_url=url, timeout=5) as c:
            while not until.is_set():
                try:
                    c.post("/orders", json=EXAMPLE_ORDER)
                except httpx.HTTPError:
                    time.sleep(0.05)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("bidders, stop, load", [("local", "sigterm", 0), ("ray", "ctrl-c", 0), ("ray", "ctrl-c", 8)])
def test_serve_answers_the_readme_order_and_stops_cleanly(bidders: str, stop: str, load: int, short_tmp: Path) -> None:
    """SIGTERM to the command, or a terminal's Ctrl-C (SIGINT to the whole foreground process
    group, Ray's own processes included): exit 0, no process of the service left, and the
    embedded Ray's temp dir and the fleet's snapshot dir gone; also when `load` clients keep
    placing orders through the stop, which takes the replica's whole grace period, after
    which Serve kills it before it has cleaned up."""
    port = spare_port()
    fleet_dirs = _fleet_dirs()
    proc = _start_serve(short_tmp, "--bidders", bidders, "--port", str(port))
    stop_load, clients = threading.Event(), []
    try:
        started = _until_serving(proc)
        assert "curl -s -X POST" in started  # how to place an order, right below
        assert "Bidders: new (no fleet saved beside the journal)" in started, started
        r = httpx.post(f"http://127.0.0.1:{port}/orders", json=EXAMPLE_ORDER, headers={"Idempotency-Key": "readme"},
                       timeout=30)
        assert r.status_code == 200 and r.json()["status"] in ("awarded", "unfulfilled"), r.text
        clients = _keep_ordering(f"http://127.0.0.1:{port}", load, stop_load)
        time.sleep(1.0 if load else 0.0)
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        said = proc.stdout.read()
        assert "bidhive stopped" in said and "failed" not in said, said  # Serve's own shutdown noise too
    finally:
        stop_load.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for t in clients:
        t.join(10)
    _assert_nothing_left(proc, short_tmp)
    assert _fleet_dirs() <= fleet_dirs, "the fleet's snapshot dir outlived the service"
    if bidders == "ray":  # the stop saved the bidders' state for the next start (under load: the runner did)
        with tempfile.TemporaryDirectory() as into:
            origin = carry_fleet(short_tmp / "j.bhj", fleet_fingerprint(load_fleet("default"), 0), into)
            assert origin.carried and origin.agents, origin


@pytest.mark.slow
@pytest.mark.timeout(300)  # a service that never says it serves fails the test instead of hanging it
def test_a_service_killed_outright_is_cleared_and_resumed_by_the_next_start(short_tmp: Path) -> None:
    """SIGKILL to `bidhive serve` (the OOM killer's way) runs none of its clean-up: Ray's
    agents live on (and the replica, holding the journal, for a while), its temp dir and the
    bidders' snapshot dir stay. The next start stops those processes, removes both dirs, and
    resumes the bidders' state from the snapshots."""
    fleet_dirs = _fleet_dirs()
    port = spare_port()
    killed = _start_serve(short_tmp, "--port", str(port))
    second: subprocess.Popen[str] | None = None
    try:
        _until_serving(killed)
        r = httpx.post(f"http://127.0.0.1:{port}/orders", json=EXAMPLE_ORDER, timeout=30)
        assert r.status_code == 200 and r.json()["status"] in ("awarded", "unfulfilled"), r.text
        ray_dirs = [p for p in short_tmp.iterdir() if p.name.startswith("bidhive-ray-")]
        assert len(ray_dirs) == 1
        killed.kill()
        killed.wait(timeout=10)
        assert len(_fleet_dirs() - fleet_dirs) == 1  # the killed service's, left behind
        second = _start_serve(short_tmp, "--port", str(spare_port()))
        said = _until_serving(second)
        assert "Bidders: resumed (the state the bidders had when the service was killed" in said, said
        assert not ray_dirs[0].exists()
        end = time.monotonic() + 15
        while _session_processes(killed.pid) and time.monotonic() < end:
            time.sleep(0.5)
        left = _session_processes(killed.pid)
        assert left == [], f"the killed service's Ray processes outlived the next start: {left}\n{said}"
        assert len(_fleet_dirs() - fleet_dirs) == 1  # the running service's own
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=90) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # what the killed one left, where the test failed
            os.killpg(killed.pid, signal.SIGKILL)
        if second is not None and second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    _assert_nothing_left(second, short_tmp)
    assert _fleet_dirs() <= fleet_dirs, "a fleet's snapshot dir outlived the services"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_start_up_aborts_it_and_leaves_nothing(short_tmp: Path, sig: signal.Signals,
                                                              code: int) -> None:
    """A Ctrl-C (SIGINT to the process group) or a service manager's stop (SIGTERM to the
    command) while Ray and Serve start (here: once the replica has opened its journal) ends
    the command at once with the shell's code for it (130, 143), and takes down what had
    started: no process, no Ray temp dir. Started as a background job of a script is, with
    SIGINT ignored, which Python keeps unless told otherwise: the Ctrl-C was lost then. A
    SIGTERM went to Ray's crash handler: a stack dump, and everything left running."""
    journal = short_tmp / "j.bhj"
    proc = _start_serve(short_tmp, "--bidders", "ray", "--fleet", "district", "--port", str(spare_port()),
                        sigint_ignored=True)
    lines: list[str] = []  # read as it comes: a full pipe would stall the command's own exit
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + 120
        while not journal.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        assert journal.exists(), "the replica never opened its journal"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            exited = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 90 s after {sig.name}; it said:\n" + "".join(lines)[-4000:])
        reader.join(10)
        said = "".join(lines)
        assert exited == code, said
        assert "bidhive is serving" not in said and "Traceback" not in said and "SIGTERM received" not in said, said
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_nothing_left(proc, short_tmp)


@pytest.mark.parametrize("args, says", [
    (["--config", "no-such.yaml"], "no-such.yaml: file not found"),
    (["--port", "0"], "--port"),
    (["--bidders", "threads"], "bidders"),
    (["--fleet", "nope"], "unknown fleet 'nope' (known: default, district, metro)"),  # before Ray starts
    (["--policy", "cheapest"], "unknown policy 'cheapest'"),
    (["--bidders", "threads"], "the command line: bidders"),  # the flag, not the config file, is wrong
    (["--host", ""], "the command line: host"),
    (["--host", "192.0.2.123", "--port", "18555"], "cannot listen on 192.0.2.123:18555"),  # not this machine's
    (["--journal", "README.md/j.bhj"], "README.md is a file, not a folder"),
    (["--journal", "/proc/j.bhj"], "cannot create the journal in /proc"),
])
def test_bad_serve_arguments_are_one_line_and_exit_2(args: list[str], says: str) -> None:
    run = subprocess.run([str(BIN), "serve", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


@pytest.mark.parametrize("token, says", [("short", "at least 8"), ("with space", "pattern")])
def test_a_bad_token_in_the_environment_is_one_line_naming_it(token: str, says: str) -> None:
    env = {**os.environ, "BIDHIVE_TOKEN": token}
    run = subprocess.run([str(BIN), "serve"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2 and "BIDHIVE_TOKEN: token:" in run.stderr and says in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and token not in run.stderr


@pytest.mark.parametrize("text, says", [
    ("applications: x\n", "no list of applications"),
    ("applications: [1]\n", "applications[0]: expected a mapping"),
    ("applications:\n  - args: [1, 2]\n", "applications[0].args: expected a mapping"),
    ("http_options: x\napplications:\n  - args: {}\n", "http_options: expected a mapping"),
    ("http_options:\n  port: 0\napplications:\n  - args: {}\n", "http_options: port"),
])
def test_a_config_file_of_the_wrong_shape_is_one_line_naming_where(tmp_path: Path, text: str, says: str) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    run = subprocess.run([str(BIN), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_an_unknown_log_level_is_one_line_and_every_name_logging_takes_passes() -> None:
    def serve(level: str) -> subprocess.CompletedProcess[str]:  # a journal it cannot use: it stops there
        return subprocess.run([str(BIN), "serve", "--journal", "README.md/j.bhj"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "BIDHIVE_LOG": level})

    run = serve("chatty")
    assert run.returncode == 2 and "BIDHIVE_LOG: unknown level 'CHATTY'" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    for level in ("warn", "NOTSET", "debug"):
        assert "is a file, not a folder" in serve(level).stderr, level


def test_a_bad_setting_in_the_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text((CONFIG_DIR / "serve.yaml").read_text().replace("journal_rotate_mb: 256",
                                                                            "journal_rotate_mb: 0"))
    run = subprocess.run([str(BIN), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "journal_rotate_mb" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_a_journal_in_use_is_refused_before_ray_starts(tmp_path: Path) -> None:
    journal = tmp_path / "j.bhj"
    with JournalWriter(journal):
        run = subprocess.run([str(BIN), "serve", "--journal", str(journal)], capture_output=True, text=True,
                             timeout=60)
    assert run.returncode == 2 and "in use by another bidhive process" in run.stderr, run.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, inside ray.serve
def test_a_replica_that_cannot_start_is_one_line_naming_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica's port held by an outgoing connection (a listener cannot bind it): Serve
    gives up on the replica, and the error says why in one line (the replica's logs go with
    the embedded cluster), with Ray stopped behind it."""
    import ray

    from serve.config import Listen, ServeCfg
    from serve.runner import ServiceStartError, launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = spare_port()
    with held_by_a_connection(port):
        with pytest.raises(ServiceStartError) as err:
            launch(ServeCfg(bidders="local", journal=str(tmp_path / "j.bhj")), Listen(host="127.0.0.1", port=port))
    message = str(err.value)
    assert message.startswith("the service did not start: ") and "\n" not in message
    assert "NoAvailablePortError" in message, message
    assert not ray.is_initialized()


def test_a_service_that_cannot_start_is_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import serve.runner
    from bidhive_cli.main import main
    from serve.runner import ServiceStartError

    def fail(*_: object, **__: object) -> None:
        raise ServiceStartError("the service did not start: why")

    monkeypatch.setattr(serve.runner, "run_service", fail)
    monkeypatch.setattr(sys, "argv", ["bidhive", "serve", "--bidders", "local", "--port", str(spare_port()),
                                     "--journal", str(tmp_path / "j.bhj")])
    with pytest.raises(SystemExit) as out:
        main()
    assert out.value.code == 1
    assert capsys.readouterr().err == "bidhive: the service did not start: why\n"


def _serve_in_process(port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[int]]:
    """`bidhive serve --port PORT` run in this process, with the service itself stubbed:
    its exit code, and the ports it was started on."""
    import serve.runner
    from bidhive_cli.main import main

    started: list[int] = []
    monkeypatch.setattr(serve.runner, "run_service", lambda cfg, listen, **_: started.append(listen.port))
    monkeypatch.setattr(sys, "argv", ["bidhive", "serve", "--bidders", "local", "--port", str(port),
                                     "--journal", str(tmp_path / "j.bhj")])
    try:
        main()
    except SystemExit as out:
        return int(out.code or 0), started
    return 0, started


def test_a_port_another_process_listens_on_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    port = spare_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        code, started = _serve_in_process(port, tmp_path, monkeypatch)
    assert (code, started) == (2, [])
    assert capsys.readouterr().err == f"bidhive: 127.0.0.1:{port} is in use; pick another with --port\n"


def test_a_port_held_only_by_closing_connections_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """After a stop under load the port sits in TCP's TIME_WAIT for a minute (nothing
    listens): the command waits for it, then starts, instead of calling it in use."""
    import bidhive_cli.serve_cmds

    port = spare_port()
    held = held_by_a_connection(port)
    held.__enter__()
    threading.Timer(1.0, held.__exit__, (None, None, None)).start()  # the connections close
    code, started = _serve_in_process(port, tmp_path, monkeypatch)
    assert (code, started) == (0, [port])
    assert "is held by the closing connections of a service stopped moments ago" in capsys.readouterr().err

    monkeypatch.setattr(bidhive_cli.serve_cmds, "PORT_WAIT_S", 0.5)
    with held_by_a_connection(port):  # never freed in time
        code, started = _serve_in_process(port, tmp_path, monkeypatch)
    assert (code, started) == (2, [])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"bidhive: 127.0.0.1:{port} is still held by connections, though nothing listens there; pick another with --port")


_SIGINT_AT_DEFAULT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
"""Runs a command with SIGINT at its default. A shell's background job (`make test &`) starts
with SIGINT ignored, its children inherit that, and Python then leaves it ignored: `serve run`
would sleep through the test's Ctrl-C."""


def _serve_run(tmp: Path, config: Path) -> subprocess.Popen[str]:
    """`serve run CONFIG` in a session of its own, as the README says to run it on one machine
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`); the Ray it starts keeps its files under `tmp`
    (`RAY_TMPDIR`, and `HOME` for the auth token Ray writes there). Ctrl-C reaches it however
    the tests were started (`_SIGINT_AT_DEFAULT`)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_TMPDIR": str(tmp / "ray"), "HOME": str(tmp / "home"), "TMPDIR": str(tmp)}
    (tmp / "home").mkdir(exist_ok=True)
    with (tmp / "serve-run.log").open("a") as log:
        return subprocess.Popen([sys.executable, "-c", _SIGINT_AT_DEFAULT, str(SERVE_CLI), "run", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp, start_new_session=True)


def _healthy(proc: subprocess.Popen[str], url: str, log: Path) -> dict[str, object]:
    """`/healthz` once the app answers it (Serve's proxy says 404 until the app is deployed)."""
    end = time.monotonic() + 150
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        time.sleep(0.5)
    raise AssertionError(f"serve run never answered /healthz: {log.read_text()[-3000:]}")


def _ctrl_c(proc: subprocess.Popen[str]) -> None:
    """A terminal's Ctrl-C: SIGINT to the whole process group; `serve run` then shuts the app and its Ray down."""
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=90)
    end = time.monotonic() + 30
    while _session_processes(proc.pid) and time.monotonic() < end:
        time.sleep(0.5)
    assert _session_processes(proc.pid) == [], "processes of serve run outlived it"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_serve_run_of_the_shipped_config_serves_on_loopback_and_resumes_its_journal(short_tmp: Path) -> None:
    """configs/serve.yaml as shipped (only its port and journal moved into a temp dir) under Ray
    Serve's own CLI: the README order is awarded, every socket of every process is on loopback
    (the replica's own gRPC server too, which Ray binds to all interfaces unless the app says
    otherwise), Ctrl-C saves the fleet beside the journal, and a second `serve run` resumes it
    and answers for the first run's order and key."""
    port = spare_port()
    cfg = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["journal"] = str(short_tmp / "j.bhj")
    config = short_tmp / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    url, log, key = f"http://127.0.0.1:{port}", short_tmp / "serve-run.log", {"Idempotency-Key": "serve-run"}
    fleet_dirs = _fleet_dirs()

    proc = _serve_run(short_tmp, config)
    try:
        assert _healthy(proc, url, log)["fleet_state"]["from"] == "new"
        first = httpx.post(f"{url}/orders", json=EXAMPLE_ORDER, headers=key, timeout=30)
        assert first.status_code == 200 and first.json()["status"] in ("awarded", "unfulfilled"), first.text
        pids = {int(line.split()[1]) for line in _session_processes(proc.pid)}
        socks = listening_addresses(pids)
        assert len(socks) >= 8 and any(s.name.startswith("ray::ServeRepli") for s in socks), socks
        assert [s for s in socks if not is_loopback(s.ip)] == []
        _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    manifest = json.loads((short_tmp / "j.bhj.fleet" / "manifest.json").read_text())
    assert manifest["saved_by"] == "stop", manifest
    assert _fleet_dirs() <= fleet_dirs, "the fleet's snapshot dir outlived serve run"

    proc = _serve_run(short_tmp, config)
    try:
        assert _healthy(proc, url, log)["fleet_state"]["from"] == "last_stop"
        order_id = first.json()["order_id"]
        got = httpx.get(f"{url}/orders/{order_id}", timeout=10)
        assert got.status_code == 200 and got.json()["award"] == first.json()["award"], got.text
        again = httpx.post(f"{url}/orders", json=EXAMPLE_ORDER, headers=key, timeout=30)
        assert again.headers.get("Idempotent-Replayed") == "true" and again.json() == first.json(), again.text
        _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _fleet_dirs() <= fleet_dirs
