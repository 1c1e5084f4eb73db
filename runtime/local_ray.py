"""Start (or join) the Ray cluster that bidhive's actors run on, loopback-only.

Why this module exists: on Linux, Ray 2.60 picks the machine's LAN address as
its node IP and then binds every gRPC server (GCS, raylet, object manager, core
workers, driver), the agents and the metrics exporters to all interfaces.
Tests, benchmarks and the default embedded cluster must keep every byte on
127.0.0.1, keep Ray's token authentication on, and leave no session files
behind. See ``docs/RAY_LOCAL.md`` for the Ray source lines each setting
relies on.

Usage::

    with local_ray(num_cpus=2) as cluster:
        ...  # ray.remote / actors as usual
        assert all(is_loopback(s.ip) for s in cluster.listening_addresses())

If ``RAY_ADDRESS`` is set, the same call joins that cluster instead and only
disconnects from it on shutdown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from runtime.leftovers import AUTH_TOKEN_FILE, RAY_OWNER, RAY_TEMP_PREFIX, SESSION_ENV, reap_dead_ray_sessions
from runtime.owner import all_pids, proc_cmdline, proc_name, proc_stat, wait_gone, write_owner

__all__ = [
    "LOOPBACK_ENV",
    "QUIET_ENV",
    "ListeningSocket",
    "LocalRay",
    "SocketAddress",
    "Terminated",
    "clear_killed_sessions",
    "embedded_requested",
    "is_loopback",
    "keep_replica_grpc_on_loopback",
    "listening_addresses",
    "local_ray",
    "peer_addresses",
    "raise_terminated",
    "session_pids",
    "start_local_ray",
]

logger = logging.getLogger(__name__)

LOOPBACK_IP = "127.0.0.1"

_GRPC_PATCH_ENV = "BIDHIVE_RAY_LOOPBACK_GRPC"
_PRELOAD_ENV = "RAY_preload_python_modules"

#: Environment the embedded cluster runs under (inherited by every Ray child).
#: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray's node-IP lookup return
#: 127.0.0.1 instead of the LAN address (the macOS/Windows default); every
#: server then binds to loopback because Ray keys its bind address on
#: "node IP is localhost". Serve's HTTP default host follows the same policy.
#: The last two make every Python worker import this module at start-up,
#: which re-points the one bind Ray hard-codes to ``[::]`` (each Serve
#: replica's inter-deployment gRPC server) at 127.0.0.1.
LOOPBACK_ENV: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_SERVE_DEFAULT_HTTP_HOST": LOOPBACK_IP,
    "RAY_USAGE_STATS_ENABLED": "0",
    _PRELOAD_ENV: __name__,
    _GRPC_PATCH_ENV: "1",
}

#: Ray's own periodic work that nobody reads on the embedded cluster (it runs without the
#: dashboard), set unless the caller's environment already names it or the dashboard is
#: asked for. On 2 cores it is not free: the dashboard agent's node-stats sweep (psutil
#: over every process) took 0.1-0.3 of a core in 250 ms bursts every few seconds, and an
#: idle metro-fleet service used 0.08 fewer cores without the three (0.27 against 0.35,
#: most of it the 25 bidders' metrics exports). With them off, p99 at 200 orders/s went
#: from 89.0 and 141.4 ms to 59.8 and 52.9 ms in alternating runs (docs/BENCHMARKS.md).
QUIET_ENV: dict[str, str] = {
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent's node-stats sweep: every 60 s, not 5 s
    "RAY_enable_metrics_collection": "0",  # Ray's own Prometheus metrics from every process: not recorded
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # Serve's controller loop: every 0.5 s, not 0.1 s
}

_ACTIVE: LocalRay | None = None


class SocketAddress(NamedTuple):
    """A process and one socket address of it (its bind or its peer address)."""

    pid: int
    name: str
    ip: str
    port: int


ListeningSocket = SocketAddress


class _Sock(NamedTuple):
    proto: str  # "tcp" or "udp"
    local_ip: str
    local_port: int
    remote_ip: str | None
    remote_port: int | None
    listening: bool


def is_loopback(ip: str) -> bool:
    """Tell whether ``ip`` only reaches this host.

    gRPC binds IPv4 loopback through an IPv6 socket, so ``::ffff:127.0.0.1``
    counts as loopback too.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# --------------------------------------------------------------------------
# Processes and sockets (psutil when importable, else /proc)
# --------------------------------------------------------------------------


def _psutil() -> Any | None:
    """Return psutil if importable (Ray vendors one once ``ray`` is imported)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def session_pids(marker: str) -> set[int]:
    """Find the processes of one Ray session on this host.

    Ray's system processes (GCS, raylet, monitor, dashboard, log monitor) carry
    the session's temp/session dir on their command line; workers and agents
    rename themselves (``ray::IDLE``), so they are found as descendants of
    those roots instead.

    Args:
        marker: A path unique to the session (its temp dir or session dir).

    Returns:
        The pids of the session's live processes (the driver is not included).
    """
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        parents[pid] = stat[1]
        if pid != os.getpid() and marker in proc_cmdline(pid):
            roots.add(pid)
    found = set(roots)
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _hex_to_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints IPv6 as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _proc_net_table(pid: int) -> dict[int, _Sock]:
    """Map socket inode -> socket for the network namespace of ``pid``."""
    table: dict[int, _Sock] = {}
    for fname in ("tcp", "tcp6", "udp", "udp6"):
        proto = fname[:3]
        try:
            lines = Path(f"/proc/{pid}/net/{fname}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            (lip, lport), (rip, rport) = (a.split(":") for a in parts[1:3])
            state, inode = parts[3], int(parts[9])
            remote_port = int(rport, 16)
            if proto == "tcp":
                listening = state == "0A"  # TCP_LISTEN
            else:
                listening = remote_port == 0  # unconnected, bound UDP socket
            table[inode] = _Sock(
                proto,
                _hex_to_ip(lip),
                int(lport, 16),
                None if listening else _hex_to_ip(rip),
                None if listening else remote_port,
                listening,
            )
    return table


def _proc_sockets(pid: int, tables: dict[str, dict[int, _Sock]]) -> list[_Sock]:
    try:
        netns = os.readlink(f"/proc/{pid}/ns/net")
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    if netns not in tables:
        tables[netns] = _proc_net_table(pid)
    out = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sock = tables[netns].get(int(target[8:-1]))
            if sock is not None:
                out.append(sock)
    return out


def _psutil_sockets(psutil: Any, pid: int) -> list[_Sock]:
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return []
    out = []
    for c in conns:
        proto = "tcp" if c.type == socket.SOCK_STREAM else "udp"
        listening = c.status == psutil.CONN_LISTEN or (proto == "udp" and not c.raddr)
        out.append(
            _Sock(
                proto,
                c.laddr.ip,
                c.laddr.port,
                c.raddr.ip if c.raddr else None,
                c.raddr.port if c.raddr else None,
                listening,
            )
        )
    return out


def _sockets(
    pids: Iterable[int], use_psutil: bool | None
) -> Iterator[tuple[int, _Sock]]:
    psutil = _psutil() if use_psutil in (None, True) else None
    if use_psutil and psutil is None:
        raise RuntimeError("psutil is not importable")
    tables: dict[str, dict[int, _Sock]] = {}
    for pid in sorted(set(pids)):
        socks = _psutil_sockets(psutil, pid) if psutil else _proc_sockets(pid, tables)
        for sock in socks:
            yield pid, sock


def _default_pids() -> set[int]:
    if _ACTIVE is None or _ACTIVE.closed:
        raise RuntimeError("no active LocalRay; pass pids explicitly")
    return _ACTIVE.pids()


def listening_addresses(
    pids: Iterable[int] | None = None, *, use_psutil: bool | None = None
) -> list[ListeningSocket]:
    """List the TCP/UDP sockets the given processes listen on.

    Args:
        pids: Processes to inspect; default: every process of the active
            :class:`LocalRay` session, driver included.
        use_psutil: Force (True) or forbid (False) psutil; None picks psutil
            when importable and falls back to /proc/net + /proc/<pid>/fd.

    Returns:
        One entry per listening socket, sorted by pid.
    """
    todo = _default_pids() if pids is None else pids
    return [
        SocketAddress(pid, proc_name(pid), s.local_ip, s.local_port)
        for pid, s in _sockets(todo, use_psutil)
        if s.listening
    ]


def peer_addresses(
    pids: Iterable[int] | None = None, *, use_psutil: bool | None = None
) -> list[SocketAddress]:
    """List the remote ends of the given processes' connected sockets.

    Complements :func:`listening_addresses`: a loopback-only cluster also never
    dials out of the host. Same arguments; ``ip``/``port`` are the peer's.
    """
    todo = _default_pids() if pids is None else pids
    return [
        SocketAddress(pid, proc_name(pid), s.remote_ip, s.remote_port)
        for pid, s in _sockets(todo, use_psutil)
        if not s.listening and s.remote_ip is not None and s.remote_port
    ]


def _rmtree(path: str, timeout_s: float = 3.0) -> bool:
    """Remove ``path``, retrying while exiting processes still write into it."""
    deadline = time.monotonic() + timeout_s
    while os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return not os.path.lexists(path)


# --------------------------------------------------------------------------
# Cluster lifecycle
# --------------------------------------------------------------------------


def embedded_requested() -> bool:
    """Whether `start_local_ray` would start an embedded cluster: no ``RAY_ADDRESS`` to join
    (or ``local``)."""
    return os.environ.get("RAY_ADDRESS", "").strip() in ("", "local")


def clear_killed_sessions() -> list[str]:
    """Stops the processes of embedded clusters whose driver was killed (SIGKILL runs no
    clean-up) and removes their temp dirs; returns the dirs' names (`runtime.leftovers`).

    Called by every embedded start, and by `bidhive serve` before it checks its journal:
    a killed service's replica can outlive it for a while, holding the journal's lock.
    """
    try:
        cleared = reap_dead_ray_sessions(_short_temp_root())
    except Exception:  # noqa: BLE001 - leftovers cost memory, not this start
        logger.exception("could not look for what killed runs left in %s", _short_temp_root())
        return []
    if cleared:
        logger.warning("removed what killed runs left: %s", ", ".join(cleared))
    return cleared


def _short_temp_root() -> str:
    """Pick a parent dir short enough for Ray's unix sockets (~107 chars)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 32 else "/tmp"


def _set_cluster_flag(enabled: bool) -> bool:
    """Set Ray's import-time ``ENABLE_RAY_CLUSTER`` constant; return the old value.

    The env var is read once when ``ray._private.ray_constants`` is imported,
    so the driver needs the module attribute patched as well.
    """
    from ray._private import ray_constants

    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = enabled
    return old


def _refresh_auth_state() -> None:
    """Make this process re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN*.

    RayConfig and the token loader cache what they read first; Ray's own
    ``_enable_token_auth`` refreshes them the same way.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class LocalRay:
    """Handle on the Ray cluster this process is connected to.

    Attributes:
        address: GCS address (host:port).
        namespace: Ray namespace of this driver.
        embedded: True if this process started the cluster (and owns it).
        temp_dir: The temp dir created for the embedded cluster, else None.
        session_dir: Ray's session dir (logs, sockets) of the cluster.
    """

    address: str
    namespace: str
    embedded: bool
    temp_dir: str | None
    session_dir: str
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    _saved_cluster_flag: bool | None = field(default=None, repr=False)
    _saved_sigterm: Any = field(default=None, repr=False)
    closed: bool = False

    def pids(self, include_driver: bool = True) -> set[int]:
        """Pids of this session's processes on this host."""
        marker = self.temp_dir or self.session_dir
        found = session_pids(marker) if marker else set()
        if include_driver and not self.closed:
            found.add(os.getpid())
        return found

    def listening_addresses(self) -> list[ListeningSocket]:
        """Listening sockets of every process of this session (driver included)."""
        return listening_addresses(self.pids())

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Disconnect; for an embedded cluster also reap it and delete its temp dir.

        Waits up to ``timeout_s`` for the session's processes to exit (kills
        leftovers, verified by start time so a reused pid is never hit), then
        removes the temp dir, retrying briefly because exiting processes may
        still flush logs into it. Idempotent.
        """
        global _ACTIVE
        if self.closed:
            return
        import ray

        procs: dict[int, int] = {}
        if self.embedded:
            for pid in self.pids(include_driver=False):
                stat = proc_stat(pid)
                if stat is not None:
                    procs[pid] = stat[2]
        try:
            ray.shutdown()
        finally:
            self.closed = True
            if _ACTIVE is self:
                _ACTIVE = None
            left = wait_gone(procs, timeout_s)
            for pid in left:
                logger.warning("Ray process %d outlived shutdown; killing it", pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if wait_gone(left, 2.0):
                logger.warning("Ray processes still alive: %s", sorted(left))
            if self.temp_dir is not None and not _rmtree(self.temp_dir):
                logger.warning("could not fully remove %s", self.temp_dir)
            self._restore()

    def _restore(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._saved_cluster_flag is not None:
            _set_cluster_flag(self._saved_cluster_flag)
        main = threading.current_thread() is threading.main_thread()
        if main and self._saved_sigterm is not None and signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, self._saved_sigterm)  # a handler set since (the service's) stays
        self._saved_sigterm = None
        _refresh_auth_state()
        self._saved_env = {}
        self._saved_cluster_flag = None

    def __enter__(self) -> LocalRay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _apply_env(env: Mapping[str, str | None], saved: dict[str, str | None]) -> None:
    """Set (or, for None, unset) variables, remembering the old values once."""
    for key, value in env.items():
        saved.setdefault(key, os.environ.get(key))
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _address_is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or is_loopback(host)


def start_local_ray(
    num_cpus: int | None = None,
    *,
    dashboard: bool = False,
    namespace: str = "bidhive",
    log_to_driver: bool = False,
    logging_level: int = logging.WARNING,
    object_store_memory: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> LocalRay:
    """Start an embedded loopback-only Ray, or join ``RAY_ADDRESS`` if set.

    Embedded mode: binds everything to 127.0.0.1, keeps token auth on with a
    fresh per-session token (a 0600 file in the session's own temp dir, so
    ``~/.ray/auth_token`` is neither read nor written), turns the dashboard UI
    off unless asked (and with it Ray's own stats and metrics, `QUIET_ENV`), and
    puts all session files in a new short temp dir that
    :meth:`LocalRay.shutdown` deletes.

    Join mode (``RAY_ADDRESS`` set, and not ``local``): plain
    ``ray.init(address=...)``; nothing is forced and nothing is deleted. For
    an explicit address Ray sends a token only under ``RAY_AUTH_MODE=token``;
    if that is unset but ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` is, it
    is set to ``token`` for this driver (Ray would fail with a bare
    ``ConnectionError`` after ~20 s instead). A loopback ``RAY_ADDRESS`` is
    kept as given (Ray would otherwise rewrite 127.0.0.1 to the LAN IP and
    hang on a loopback-only cluster).

    Args:
        num_cpus: CPUs the embedded node advertises (ignored in join mode).
        dashboard: Start the dashboard UI (on 127.0.0.1) in embedded mode.
        namespace: Ray namespace for named actors.
        log_to_driver: Stream worker stdout/stderr to this process.
        logging_level: Level of Ray's driver-side loggers.
        object_store_memory: Object store bytes (embedded mode only).
        runtime_env: Job-level runtime env.
        extra_env: Extra environment for the cluster's processes (embedded)
            or this driver (join); restored on shutdown.

    Returns:
        The handle; call :meth:`LocalRay.shutdown` (or use it as a context
        manager) when done.

    Raises:
        RuntimeError: If Ray is already initialized in this process.
    """
    global _ACTIVE
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process")
    address = os.environ.get("RAY_ADDRESS", "").strip()
    join = not embedded_requested()
    init_kwargs: dict[str, Any] = {
        "namespace": namespace,
        "log_to_driver": log_to_driver,
        "logging_level": logging_level,
        "runtime_env": runtime_env,
    }
    saved: dict[str, str | None] = {}
    handle = LocalRay("", namespace, not join, None, "", saved)
    try:
        if join:
            env = dict(extra_env or {})
            token_vars = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
            token_given = any(os.environ.get(k) for k in token_vars)
            if token_given and "RAY_AUTH_MODE" not in {**os.environ, **env}:
                env["RAY_AUTH_MODE"] = "token"
            _apply_env(env, saved)
            _refresh_auth_state()
            if _address_is_loopback(address):
                handle._saved_cluster_flag = _set_cluster_flag(False)
            ray.init(address=address, **init_kwargs)
        else:
            clear_killed_sessions()
            temp_dir = tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=_short_temp_root())
            handle.temp_dir = temp_dir
            write_owner(temp_dir, RAY_OWNER)  # so a start after this driver is killed clears the dir
            token_path = os.path.join(temp_dir, AUTH_TOKEN_FILE)
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            env: dict[str, str | None] = {
                **({} if dashboard else {k: v for k, v in QUIET_ENV.items() if k not in os.environ}),
                **LOOPBACK_ENV,
                _PRELOAD_ENV: ",".join(
                    filter(None, (os.environ.get(_PRELOAD_ENV), __name__))
                ),
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": token_path,
                SESSION_ENV: temp_dir,  # how the next start finds this cluster's processes if we are killed
                "RAY_AUTH_TOKEN": None,  # it would win over our per-session file
                **(extra_env or {}),
            }
            _apply_env(env, saved)
            handle._saved_cluster_flag = _set_cluster_flag(False)
            _refresh_auth_state()
            ray.init(
                address="local",
                num_cpus=num_cpus,
                object_store_memory=object_store_memory,
                include_dashboard=dashboard,
                dashboard_host=LOOPBACK_IP,
                _node_ip_address=LOOPBACK_IP,
                _temp_dir=temp_dir,
                **init_kwargs,
            )
    except BaseException:
        handle.shutdown(timeout_s=5.0)
        raise
    node = ray._private.worker._global_node
    handle.address = ray.get_runtime_context().gcs_address
    handle.session_dir = node.get_session_dir_path() if node is not None else ""
    _ACTIVE = handle
    handle._saved_sigterm = _sigterm_to_python()  # last: from here on the handle's cleanup is reachable
    return handle


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is while an embedded cluster runs. A kind of
    KeyboardInterrupt, so what stops cleanly on Ctrl-C (the start-up's cleanup, pytest)
    stops on it too; the CLI exits 143 on it."""


def _sigterm_to_python() -> Any:
    """Hands SIGTERM back to Python after `ray.init` (as `Terminated`); returns the handler
    it replaces, or None off the main thread. Ray's driver installs a C++ crash handler for
    it too, which prints a stack dump and ends the process on the spot: a service
    manager's stop then left the cluster's processes and temp dir to the next start. Its
    handlers for real crashes (SIGSEGV, SIGABRT) stay."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_terminated)


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler that raises `Terminated` where the main thread is."""
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, **kwargs: Any) -> Iterator[LocalRay]:
    """Context-manager form of :func:`start_local_ray` (same arguments)."""
    handle = start_local_ray(num_cpus, **kwargs)
    try:
        yield handle
    finally:
        handle.shutdown()


def keep_replica_grpc_on_loopback() -> bool:
    """In a Serve replica on a loopback-only node, keep its gRPC server on 127.0.0.1 too.

    `bidhive serve` gets this from the preload (`LOOPBACK_ENV`). ``serve run
    configs/serve.yaml`` starts workers without it, so the app's replica calls this from
    its constructor, which Serve runs before it starts that server
    (``Replica.initialize``, then ``_on_initialized``). On a node with a network address
    the wildcard bind stays: replicas and proxies on other nodes call this one there.

    Returns:
        Whether the replica's wildcard binds now go to 127.0.0.1.
    """
    import ray

    if not is_loopback(ray.util.get_node_ip_address()):
        return False
    _patch_wildcard_grpc_binds()
    return True


def _patch_wildcard_grpc_binds() -> None:
    """Bind Ray's Python gRPC servers that ask for ``[::]`` to 127.0.0.1 instead.

    Ray 2.60's Serve replica starts its inter-deployment gRPC server on
    ``"[::]:0"`` (``ray/serve/_private/replica.py``) whatever the node IP, and
    no setting changes it. It binds through
    ``ray._common.tls_utils.add_port_to_grpc_server``, which the replica
    module imports by name: patching the helper before Serve is imported (at
    worker start via ``RAY_preload_python_modules``) is enough, and a replica
    module imported already gets the patched name too.
    """
    from ray._common import tls_utils

    add_port = tls_utils.add_port_to_grpc_server
    if not getattr(add_port, "_bidhive_loopback", False):
        original = add_port

        def add_port(server: Any, address: str) -> int:
            host, _, port = address.rpartition(":")
            if host.strip("[]") in ("", "::", "0.0.0.0"):
                address = f"{LOOPBACK_IP}:{port}"
            return original(server, address)

        add_port._bidhive_loopback = True  # type: ignore[attr-defined]
        tls_utils.add_port_to_grpc_server = add_port
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None and hasattr(replica, "add_port_to_grpc_server"):
        replica.add_port_to_grpc_server = add_port


# Runs in Ray workers of an embedded cluster (preloaded, see LOOPBACK_ENV); a
# no-op in the driver, which imports this module before setting the flag.
if os.environ.get(_GRPC_PATCH_ENV) == "1" and "ray" in sys.modules:
    _patch_wildcard_grpc_binds()
