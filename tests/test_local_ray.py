"""The embedded Ray cluster stays on loopback, keeps token auth on, cleans up.

One cluster serves the whole module (starting Ray costs seconds); the
shutdown test tears it down, so the tests run in file order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from runtime.local_ray import (  # noqa: E402
    QUIET_ENV,
    LocalRay,
    is_loopback,
    listening_addresses,
    peer_addresses,
    session_pids,
    start_local_ray,
)
from serve.runner import SERVE_ENV, spare_port  # noqa: E402

HOME_TOKEN = Path.home() / ".ray" / "auth_token"


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _start_times(pids: set[int]) -> dict[int, str]:
    return {pid: st[1] for pid in pids if (st := _stat(pid)) is not None}


def _alive(procs: dict[int, str]) -> list[int]:
    """Pids still running as the same process (not a zombie, not a reused pid)."""
    return [
        pid
        for pid, start in procs.items()
        if (st := _stat(pid)) is not None and st[0] != "Z" and st[1] == start
    ]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _wait_until(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRay]:
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)  # this module tests the embedded path
    home_token_before = HOME_TOKEN.exists()
    handle = start_local_ray(num_cpus=2, extra_env=SERVE_ENV)  # Serve's settings as `bidhive serve` has them
    try:
        yield handle
    finally:
        handle.shutdown()
        mp.undo()
        assert HOME_TOKEN.exists() == home_token_before, "touched ~/.ray/auth_token"


def test_task_and_actor_run_with_token_auth(cluster: LocalRay) -> None:
    @ray.remote
    def square(x: int) -> int:
        return x * x

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    counter = Counter.remote()
    assert ray.get(square.remote(7)) == 49
    assert ray.get([counter.add.remote(2), counter.add.remote(3)]) == [2, 5]
    ray.kill(counter)

    # Auth is on and enforced: the GCS rejects a call without the session token.
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert token_path.parent == Path(cluster.temp_dir)
    assert token_path.stat().st_mode & 0o077 == 0
    token = token_path.read_text().strip()
    with grpc.insecure_channel(cluster.address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetClusterIdRequest()
        with pytest.raises(grpc.RpcError) as denied:
            stub.GetClusterId(request, timeout=10)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bearer = [("authorization", f"Bearer {token}")]
        stub.GetClusterId(request, metadata=bearer, timeout=10)


def test_nothing_listens_beyond_loopback(cluster: LocalRay) -> None:
    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    actor_pid = ray.get(probe.pid.remote())
    pids = cluster.pids()
    assert actor_pid in pids and os.getpid() in pids

    socks = listening_addresses(pids)
    names = {s.name for s in socks}
    assert len(socks) >= 8, socks  # GCS, raylet x2, agents, metrics, workers, driver
    assert {"gcs_server", "raylet"} <= names, names
    assert actor_pid in {s.pid for s in socks}
    gcs_port = int(cluster.address.rsplit(":", 1)[1])
    assert gcs_port in {s.port for s in socks}
    assert [s for s in socks if not is_loopback(s.ip)] == []
    assert [p for p in peer_addresses(pids) if not is_loopback(p.ip)] == []

    # The /proc fallback sees the same world.
    raw = listening_addresses(pids, use_psutil=False)
    assert gcs_port in {s.port for s in raw} and len(raw) >= 8
    assert [s for s in raw if not is_loopback(s.ip)] == []
    ray.kill(probe)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def test_ray_s_own_stats_and_metrics_are_off_on_the_embedded_cluster(cluster: LocalRay) -> None:
    """`QUIET_ENV` reaches the processes that read it: the dashboard agent and the workers."""
    @ray.remote(num_cpus=0)
    class Probe:
        def environ(self) -> dict[str, str]:
            return dict(os.environ)

    probe = Probe.remote()
    worker = ray.get(probe.environ.remote())
    agents = [p for p in cluster.pids() if "dashboard/agent.py" in " ".join(_cmdline_words(p))]
    assert agents, "no dashboard agent found"
    for env in (worker, *map(_environ, agents)):
        assert {k: env.get(k) for k in QUIET_ENV} == QUIET_ENV
    ray.kill(probe)


def _cmdline_words(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, inside ray.serve
def test_serve_stays_on_loopback(cluster: LocalRay) -> None:
    from ray import serve

    port = spare_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, request) -> str:
            return "ok"

    try:
        handle = serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo", timeout=10) as r:
            assert r.read() == b"ok"
        assert handle.remote(None).result(timeout_s=10) == "ok"
        socks = listening_addresses(cluster.pids())
        replicas = [s for s in socks if s.name.startswith("ray::ServeRepli")]
        assert len(replicas) >= 2, socks  # core-worker gRPC + inter-deployment gRPC
        assert port in {s.port for s in socks}
        assert [s for s in socks if not is_loopback(s.ip)] == []
    finally:
        serve.shutdown()


def test_shutdown_removes_temp_dir_and_processes(cluster: LocalRay) -> None:
    temp_dir = cluster.temp_dir
    assert temp_dir is not None and os.path.isdir(temp_dir)
    assert len(temp_dir) < 40  # unix socket paths below it stay < 107 chars
    procs = _start_times(cluster.pids(include_driver=False))
    assert len(procs) >= 4

    cluster.shutdown()

    assert not ray.is_initialized()
    assert not os.path.exists(temp_dir)
    assert _wait_until(lambda: not _alive(procs), 5.0), _alive(procs)
    assert session_pids(temp_dir) == set()
    for key in ("RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        assert key not in os.environ
    cluster.shutdown()  # idempotent


@pytest.mark.slow
def test_ray_address_joins_and_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if ray.is_initialized():  # the module's cluster; one driver per process
        request.getfixturevalue("cluster").shutdown()
    head_dir = tempfile.mkdtemp(prefix="bh-head-")
    token = os.urandom(32).hex()
    port = spare_port()
    head_env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={head_dir}",
        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, env=head_env, check=True, capture_output=True, timeout=60)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # RAY_AUTH_MODE left unset
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        joined = start_local_ray()
        try:
            assert not joined.embedded and joined.temp_dir is None
            assert ray.get(ray.remote(lambda: 3).remote()) == 3
            socks = joined.listening_addresses()
            assert len(socks) >= 6
            assert [s for s in socks if not is_loopback(s.ip)] == []
        finally:
            joined.shutdown()
        assert "RAY_AUTH_MODE" not in os.environ
        assert os.path.isdir(joined.session_dir)  # joined cluster's files untouched
        head_names = {_comm(p) for p in session_pids(head_dir)}
        assert {"gcs_server", "raylet"} <= head_names
    finally:
        # gcs_server and the monitor sit out SIGTERM for seconds; this head is ours.
        procs = _start_times(session_pids(head_dir))
        for pid in procs:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert _wait_until(lambda: not _alive(procs), 5.0), _alive(procs)
        shutil.rmtree(head_dir, ignore_errors=True)
