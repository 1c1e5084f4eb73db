"""`bidhive serve`: an embedded loopback-only Ray (or `RAY_ADDRESS`), Serve, the app; stop on a signal.

Ctrl-C or SIGTERM shuts Serve down (the replica closes the journal and kills its bidder
actors), then the embedded Ray with every process and temp file it started.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from runtime.local_ray import LocalRay
from runtime.owner import process_start
from serve.config import FLEET_DIR_PREFIX, FLEET_DIR_PREFIX_ENV, SERVICE_PROCESS_ENV, Listen, ServeCfg

logger = logging.getLogger("bidhive.serve")

#: The Serve application's name (`bidhive serve`, and the `name` in configs/serve.yaml).
APP_NAME = "bidhive"

#: Where `spare_port` starts looking: above `ray start`'s worker ports (10002-19999).
_PRIVATE_PORTS_FROM = 20000

EXAMPLE_ORDER = {
    "customer_id": "c-42", "tier": "vip", "items": [{"sku": "sku-00007", "qty": 2}],
    "destination": {"lat": 31.2304, "lon": 121.4737}, "promise_minutes": 90, "value": 59.0,
}

#: Settings for a lean request path on a small machine (read when Ray and Serve start);
#: `launch` adds `RAY_BIDDER_ENV` (bidder workers at normal priority, not Ray's nice 15).
SERVE_ENV = {
    "RAY_SERVE_LOG_TO_STDERR": "0",             # request logs go to files, not the terminal
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    # Serve kills a proxy that is not ready in 5 s, and `serve.start` then fails: on two busy
    # cores (two CPU hogs) its start-up took longer. Reproduced in `test_serve_stays_on_loopback`.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress: the replica itself listens on `port`, no proxy hop.

    Measured here (metro fleet, Ray bidders, 48 closed-loop clients, same load): 102
    orders/s against 57 through the proxy actor, which costs ~5-6 ms of CPU per request
    and makes the replica call back to it for every request's body and disconnect.
    Serve still starts its proxy; it gets a spare port and nobody is pointed at it.
    """
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # direct ingress, user code on the replica's loop
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # the range is half-open
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # no load balancer to deregister from
    }


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports (Linux's default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def spare_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port nothing listens on now, outside the kernel's ephemeral range.

    Why not bind to port 0: that hands out an ephemeral port, which any outgoing connection
    may take as its source port before Serve binds it, and a listener cannot bind a port a
    connection holds. Serve then starts the replica again (each start opens a journal
    segment) and gives up after a few tries; starting a cluster opens hundreds of
    connections, and one CI run's restart got an extra segment this way.
    Ray's own `ray start` worker ports (10002-19999) are below the range used here.
    """
    rng = rng or random.Random()
    low = _PRIVATE_PORTS_FROM
    high = min(_ephemeral_range()[0], 65536)
    for _ in range(200):
        port = rng.randrange(low, high) if high > low else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port on {host} in {low}-{high - 1}")


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (checked before Ray starts, for a one-line error)."""
    return bind_error(host, port) is None


def bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be bound now (in use, or an address this machine does not
    have or cannot resolve), or None where it can."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:  # socket.gaierror too: a name that does not resolve
            return err
    return None


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on `host:port` (or it cannot be told: an
    address this IPv4 probe cannot reach counts as taken, as `port_free` counts it)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            return s.connect_ex((host, port)) == 0
        except OSError:
            return True


def wait_port_free(host: str, port: int, timeout_s: float) -> bool:
    """Waits until `host:port` can be bound; False after `timeout_s`.

    Why wait: a service stopped under load closes its clients' connections itself, and
    each then stays in TCP's TIME_WAIT for a minute, holding the port. Serve binds its
    direct-ingress port without SO_REUSEADDR, so no new service could listen there before.
    """
    end = time.monotonic() + timeout_s
    while not port_free(host, port):
        if time.monotonic() >= end:
            return False
        time.sleep(0.5)
    return True


class ServiceStartError(RuntimeError):
    """Serve could not start the app's replica (the message says why, in one line)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _deploy_failure(app: str) -> str | None:
    """The last line of the failed deployment's message: the replica's own exception.

    Read before Ray stops, because the replica's logs go with the embedded cluster's temp dir.
    """
    from ray import serve

    try:
        deployments = serve.status().applications[app].deployments.values()
    except Exception:  # noqa: BLE001 - a status we cannot read must not hide the failure itself
        return None
    for dep in deployments:
        lines = [line.strip() for line in _ANSI.sub("", dep.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return None


def launch(cfg: ServeCfg, listen: Listen) -> LocalRay:
    """Starts Ray (embedded, or joins RAY_ADDRESS), Serve and the app; returns the cluster handle.

    Embedded: direct ingress on `listen`. Joined cluster: its Serve proxy on `listen`
    (the cluster's own settings decide the rest).
    """
    from runtime.local_ray import embedded_requested, start_local_ray
    from runtime.ray_bidders import RAY_BIDDER_ENV

    embedded = embedded_requested()
    env = {**RAY_BIDDER_ENV, **SERVE_ENV, **(direct_ingress_env(listen.port) if embedded else {}),
           FLEET_DIR_PREFIX_ENV: f"{FLEET_DIR_PREFIX}{secrets.token_hex(4)}-",  # this run's (`stop_service`)
           **_this_process_env()}
    cluster = start_local_ray(extra_env=env)
    try:
        from ray import serve

        from serve.app import build

        proxy_port = spare_port(listen.host) if embedded else listen.port
        serve.start(http_options={"host": listen.host, "port": proxy_port})
        try:
            serve.run(build(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as err:  # Serve gave up on the replica; the reason is in its status
            raise ServiceStartError(f"the service did not start: {_deploy_failure(APP_NAME) or err}") from None
    except BaseException:
        stop_service(cluster)
        raise
    return cluster


def _this_process_env() -> dict[str, str]:
    """Names this process as the one the run's fleet dirs belong to (`SERVICE_PROCESS_ENV`):
    while it lives, no other start takes them, even between a replica's death and its restart."""
    started = process_start(os.getpid())
    return {} if started is None else {SERVICE_PROCESS_ENV: f"{os.getpid()}:{started}"}


def stop_service(cluster: LocalRay, cfg: ServeCfg | None = None) -> None:
    """Shuts Serve down (the replica closes the journal, kills its bidders), then Ray.

    On the embedded cluster, deleting the app is enough: the replica shuts down gracefully
    and the rest goes with the cluster. `serve.shutdown()` would have the controller end
    its own shutdown call by killing itself, which Ray reports on the terminal as a failed
    task ("(raylet) Task ServeController.graceful_shutdown failed...") on every stop. A
    cluster joined through `RAY_ADDRESS` outlives us, so there Serve is shut down whole.

    Under load, the replica's stop can take all of its grace period draining requests,
    and Serve then kills it before it has saved its bidders' state beside the journal and
    removed their snapshot dir. So here (embedded cluster: the replica ran on this
    machine), once Ray and the bidders are gone, a dir left behind is saved for the next
    start (`serve.fleet_state.save_after_kill`, given the service's `cfg`), then removed.
    """
    fleet_dirs = os.environ.get(FLEET_DIR_PREFIX_ENV) if cluster.embedded else None
    try:
        from ray import serve

        if not cluster.embedded:
            serve.shutdown()
            return
        from ray.serve.exceptions import RayServeException

        try:
            serve.delete(APP_NAME)
        except RayServeException:  # Serve never started: nothing of it to stop
            pass
        except Exception as err:  # noqa: BLE001 - a replica that hangs: Ray's shutdown ends it
            logger.warning("the app did not stop by itself (%s); stopping Ray", err)
    finally:
        cluster.shutdown()
        if fleet_dirs:
            from agents.actor import default_state_root

            left = list(Path(default_state_root()).glob(f"{fleet_dirs}*"))
            if cfg is not None and cfg.bidders == "ray" and len(left) == 1:
                _save_left_fleet(left[0], cfg)
            for dir_left in left:
                shutil.rmtree(dir_left, ignore_errors=True)


def _save_left_fleet(state_dir: Path, cfg: ServeCfg) -> None:
    """The fleet a killed replica left, saved for the next start; a failure costs only that."""
    from serve.fleet_state import save_after_kill

    try:
        if save_after_kill(state_dir, Path(cfg.journal)):
            logger.warning("the service was stopped before it saved its bidders' state: saved it now")
    except Exception:  # noqa: BLE001 - the stop goes on; the next start takes a new fleet
        logger.exception("the bidders' state could not be saved: the next start begins with a new fleet")


def curl_example(url: str, token: bool = False) -> str:
    """The one-line curl that places an order (what `make run` and the README show)."""
    auth = ' -H "Authorization: Bearer $BIDHIVE_TOKEN"' if token else ""
    return (f"curl -s -X POST {url}/orders -H 'Content-Type: application/json' "
            f"-H 'Idempotency-Key: demo-1'{auth} -d '{json.dumps(EXAMPLE_ORDER, separators=(',', ':'))}'")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _: FrameType | None) -> None:
        logger.warning("signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def fleet_line(url: str) -> str:
    """A line on where the bidders' state came from, as ``/healthz`` says (none if it cannot)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own loopback service
    try:
        try:
            with direct.open(f"{url}/healthz", timeout=5.0) as answer:
                body = answer.read()
        except urllib.error.HTTPError as degraded:  # 503 still says where the bidders came from
            body = degraded.read()
        state = json.loads(body)["fleet_state"]
        return f"\nBidders: {'resumed' if state['from'] == 'last_stop' else 'new'} ({state['why']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def run_service(cfg: ServeCfg, listen: Listen, say: Callable[[str], None] = print,
                stop: threading.Event | None = None) -> None:
    """Runs the service until `stop` is set (by default: until SIGINT or SIGTERM)."""
    started = time.perf_counter()
    if threading.current_thread() is threading.main_thread():
        # A job started in the background (`cmd &` in a script) inherits SIGINT ignored, and
        # Python keeps it so: a Ctrl-C during start-up was lost, then the service ran on. It
        # is honoured after start-up (`_stop_on_signals`), so it is honoured during it too.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = launch(cfg, listen)
    try:
        stop = stop or _stop_on_signals()  # after ray.init, whose fatal-signal handler would otherwise take SIGTERM
        url = f"http://{listen.host}:{listen.port}"
        token = bool(cfg.token or os.environ.get("BIDHIVE_TOKEN"))
        say(f"bidhive is serving on {url} ({cfg.bidders} bidders, journal {cfg.journal}, "
            f"ready in {time.perf_counter() - started:.1f} s). Place an order:\n  {curl_example(url, token)}\n"
            f"API docs: {url}/docs   Stop: Ctrl-C{fleet_line(url)}")
        while not stop.wait(0.5):
            pass
    finally:
        stop_service(cluster, cfg)
        say("bidhive stopped")
