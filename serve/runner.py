"""`bidhive serve`: an embedded loopback-only Ray (or `RAY_ADDRESS`), Serve, the app; stop on a signal.

Ctrl-C or SIGTERM shuts Serve down (the replica closes the journal and kills its bidder
actors), then the embedded Ray with every process and temp file it started.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from serve.config import Listen, ServeCfg

logger = logging.getLogger("bidhive.serve")

EXAMPLE_ORDER = {
    "customer_id": "c-42", "tier": "vip", "items": [{"sku": "sku-00007", "qty": 2}],
    "destination": {"lat": 31.2304, "lon": 121.4737}, "promise_minutes": 90, "value": 59.0,
}

#: Settings for a lean request path on a small machine (read when Ray and Serve start).
SERVE_ENV = {
    "RAY_SERVE_LOG_TO_STDERR": "0",             # request logs go to files, not the terminal
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    # Ray runs workers at nice 15, so any other busy process (a load generator, a build)
    # takes the cores first; here the workers are the service, so they run at normal priority.
    "RAY_worker_niceness": "0",
}


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


def run_service(cfg: ServeCfg, listen: Listen, say: Callable[[str], None] = print,
                stop: threading.Event | None = None) -> None:
    """Runs the service until `stop` is set (by default: until SIGINT or SIGTERM)."""
    from runtime.local_ray import start_local_ray
    from runtime.ray_bidders import RAY_BIDDER_ENV

    started = time.perf_counter()
    cluster = start_local_ray(extra_env={**RAY_BIDDER_ENV, **SERVE_ENV})
    # after ray.init, whose fatal-signal handler would otherwise take SIGTERM
    stop = stop or _stop_on_signals()
    try:
        from ray import serve

        from serve.app import build

        serve.start(http_options={"host": listen.host, "port": listen.port})
        serve.run(build(cfg), name="bidhive", route_prefix="/", blocking=False)
        url = f"http://{listen.host}:{listen.port}"
        token = bool(cfg.token or os.environ.get("BIDHIVE_TOKEN"))
        say(f"bidhive is serving on {url} ({cfg.bidders} bidders, journal {cfg.journal}, "
            f"ready in {time.perf_counter() - started:.1f} s). Place an order:\n  {curl_example(url, token)}\n"
            f"API docs: {url}/docs   Stop: Ctrl-C")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            cluster.shutdown()
        say("bidhive stopped")
