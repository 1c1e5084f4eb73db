"""The load generator of `bench/serve_load.py`: locust FastHttpUsers posting orders, one phase per process.

    nice -n 19 python bench/serve_locustfile.py SPEC.json OUT.json

Runs locust as a library (headless, no web UI, no master/worker), so this process does
exactly one phase and stops on its own bound, and so the bench's parent never imports
locust (its gevent monkey-patching would change the parent's sockets and threads). The
bench starts it at a lower priority than the service, so on 2 cores the generator gets
what the service leaves.

Two modes, given in SPEC (JSON):
- ``closed``: `users` users each post the next order as soon as the last is answered,
  for `duration_s` (capacity: whatever the service sustains with that concurrency).
- ``open``: arrivals on a fixed schedule, order k due at ``k / rate`` seconds. A pool of
  `users` users takes the next due slot when free, sleeps until it is due and posts it,
  so the offered rate does not depend on how fast the service answers (no coordinated
  omission) as long as the pool has a free user; each send's lag behind its due time is
  recorded, so the bench can show how far the offered rate was really offered.

Each request is recorded as (slot, due_s, sent_s, latency_s, status, order_id,
answer_status), times relative to the phase start (``t0_monotonic`` in the result, on
this machine's monotonic clock, so other readings can be lined up with them); status 0 is
a transport failure.
Locust's own request totals come along as a cross-check.
"""
from locust import FastHttpUser, task  # first: locust monkey-patches for gevent on import

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from locust.env import Environment
from locust.exception import StopUser

#: Seconds between starting the users and the phase's time zero (all users are up by then).
LEAD_S = 1.5


@dataclass
class Phase:
    """The phase this process runs, and what it has seen so far (one per process)."""

    spec: dict[str, Any]
    bodies: list[bytes]
    t0: float = 0.0
    next_slot: int = 0
    in_flight: int = 0  # slots taken and not yet answered (waiting for their due time, or sent)
    records: list[tuple[int, float, float, float, int, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Slots in the phase: the schedule's length (open), or the request cap (closed)."""
        if self.spec["mode"] == "open":
            return int(round(self.spec["rate"] * self.spec["duration_s"]))
        return int(self.spec["max_requests"])

    def take(self) -> tuple[int, float] | None:
        """The next slot and when it is due (relative), or None when the phase is over."""
        now = time.perf_counter() - self.t0
        if self.next_slot >= self.total or (self.spec["mode"] == "closed" and now >= self.spec["duration_s"]):
            return None
        slot = self.next_slot
        self.next_slot += 1
        self.in_flight += 1
        due = slot / self.spec["rate"] if self.spec["mode"] == "open" else max(now, 0.0)
        return slot, due

    def finished(self) -> bool:
        """No slot left to take and none taken and unanswered."""
        over = self.next_slot >= self.total or time.perf_counter() - self.t0 >= self.spec["duration_s"]
        return over and self.in_flight == 0


PHASE: Phase | None = None


class OrderUser(FastHttpUser):
    """Posts orders from the phase's schedule, one request at a time per user."""

    concurrency = 1  # one connection per user: users are the concurrency
    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def post_order(self) -> None:
        """Takes a slot, waits until it is due, posts it and records the answer."""
        assert PHASE is not None
        taken = PHASE.take()
        if taken is None:
            raise StopUser()
        slot, due = taken
        try:
            wait = PHASE.t0 + due - time.perf_counter()
            if wait > 0:
                gevent.sleep(wait)
            record = self._post(slot, due)
        finally:
            PHASE.in_flight -= 1
        PHASE.records.append(record)
        if PHASE.spec["mode"] == "closed" and record[4] == 503:
            gevent.sleep(self.retry_after_s)  # a closed-loop client honours Retry-After, as real ones do

    retry_after_s = 1.0

    def _post(self, slot: int, due: float) -> tuple[int, float, float, float, int, str, str]:
        assert PHASE is not None
        headers = {"Content-Type": "application/json",
                   "Idempotency-Key": f"{PHASE.spec['name']}-{slot}-{PHASE.spec['run_id']}"}
        sent = time.perf_counter()
        with self.client.post("/orders", data=PHASE.bodies[slot % len(PHASE.bodies)], headers=headers,
                              name="POST /orders", catch_response=True) as resp:
            latency = time.perf_counter() - sent
            status = int(resp.status_code or 0)
            if status == 503:
                self.retry_after_s = float(resp.headers.get("Retry-After") or 1.0)
            order_id, answer = "", ""
            if status in (200, 202):
                body = json.loads(resp.content)
                order_id, answer = str(body.get("order_id", "")), str(body.get("status", ""))
            resp.success()  # the bench classifies answers itself; keep locust's failure log quiet
        return slot, round(due, 6), round(sent - PHASE.t0, 6), round(latency, 6), status, order_id, answer


def _raise_fd_limit() -> None:
    """One socket per user: a thousand users need more than the common 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one phase to its bound and returns its records and locust's totals."""
    global PHASE
    bodies = [json.dumps(b, separators=(",", ":")).encode() for b in json.loads(Path(spec["bodies"]).read_text())]
    PHASE = Phase(spec, bodies)
    env = Environment(user_classes=[OrderUser], host=spec["host"])
    runner = env.create_local_runner()
    PHASE.t0 = time.perf_counter() + LEAD_S
    runner.start(spec["users"], spawn_rate=spec["users"])
    done = Event()

    def watch() -> None:
        while not PHASE.finished():
            gevent.sleep(0.05)
        done.set()

    gevent.spawn(watch)
    done.wait(timeout=LEAD_S + spec["duration_s"] + spec["drain_s"])
    ended = time.perf_counter() - PHASE.t0
    in_flight = PHASE.in_flight
    runner.quit()
    total = env.stats.total
    return {
        "records": PHASE.records, "slots_taken": PHASE.next_slot, "slots": PHASE.total,
        "in_flight_at_stop": in_flight, "ended_s": round(ended, 3), "t0_monotonic": PHASE.t0,
        "locust": {"requests": total.num_requests, "failures": total.num_failures,
                   "median_ms": total.median_response_time, "p99_ms": total.get_response_time_percentile(0.99)},
    }


def main() -> None:
    """`serve_locustfile.py SPEC.json OUT.json`: runs the phase, writes its result."""
    spec_path, out_path = sys.argv[1], sys.argv[2]
    _raise_fd_limit()
    result = run_phase(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
