"""`RayBidders`: the engine's `Bidders` seam over one Ray actor per resource.

One call per bidder per round: the round is pickled once and travels inside every
bidder's call, over the bidder's direct channel when it runs on this node
(`runtime.channel`, a third of the CPU of a Ray call), else as a Ray call (put once in
the object store when large: `pack_rounds`); a wait with the deadline as its timeout
(`runtime.channel.wait`, `ray.wait` for Ray calls) closes the round with whatever
arrived. Each quote is validated (`market.validation`) before the engine sees it, and
quotes are handed over in fleet order, so with no faults the awards are exactly those
of the in-process run. What happened to each bidder is counted per round
(`RoundFacts`): asked, received, no quote, timed out, failed, invalid, quarantined.

Faults: a bidder that is late, dead or returns garbage is absent from that round and
is told to release its hold (the release queues behind its late call, so it frees the
hold whenever the call finishes). After `quarantine_after` consecutive failures it is
not asked for `quarantine_rounds` rounds; then a `ping` probe decides whether it is
re-admitted. Commits: a commit the bidder refuses (its hold was lost in a crash, it
lied about capacity, or the commit reached it after `COMMIT_WINDOW` of the deadline)
is reported back to the engine, which leaves those orders unserved (`commit_refused`)
and retries them. When the call carrying a commit is lost (late, or the actor died),
the commit is "in doubt": the bidder is asked (`commit_status`, queued behind the lost
call, or answered from the snapshot after a restart) what it really did. So an order
counts as awarded exactly when its winner committed it. When one side of an order
refuses, the side that committed is sent a cancel (`Settle.cancel`, riding on its next
call like any settle, sent again if that call is lost), which frees the capacity and
stock its line took. `orphaned` counts, per bidder, the lines still committed for
orders whose other side refused: a cancel not yet acknowledged, or a job that ended
before its cancel arrived.

Two ways to drive it:
- the `Bidders` protocol (`quote_all`, `settle`): the simulator's synchronous rounds;
  settle waits for the winners' commit acks (releases are fire-and-forget).
- the pipelined protocol used by the auctioneer (`exchange` or `send`/`receive`,
  `defer_settle`, `flush`): a round's settle messages ride on the same actor call as
  the next rounds' quotes (settles are applied first), and several queued rounds can
  share one call (the rounds are pickled once, as one list). Commit acks arrive with the
  next call and confirm the round. `send`/`receive` let the auctioneer keep two calls
  in flight and clear one while the bidders quote the other.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import pickle
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from agents.actor import (
    AgentSpec, BidderHost, Fault, Reply, Settle, bidder_actor_class, default_state_root, fleet_specs,
)
from agents.fleet import Fleet
from market.engine import Refusal
from market.round import Round
from market.types import AwardLine, Kind, Quote
from market.validation import RoundShape, validate_quote
from runtime import channel
from runtime.channel import Channel, ChannelBroken, ChannelServer
from runtime.gc_pauses import bound_gc_pauses

logger = logging.getLogger("bidhive.ray")

RayError = ray.exceptions.RayError

#: Environment for a cluster that hosts bidder actors (`start_local_ray(extra_env=...)`).
#: The raylet warns (on the driver's stdout, which breaks `--json` output) once it has
#: started 4x `maximum_startup_concurrency` workers, which defaults to the CPU count;
#: one actor per resource means 25-50 processes on two cores by design. Starting them
#: more concurrently measured the same total start time here (23-25 s for 25 actors).
#: Ray also starts workers at nice 15, so any other busy process (a training run, a build,
#: a load generator) takes the cores first; the bidders are the work here, so they run at
#: normal priority. `simulate --scenario weekday --orders 400 --ray` beside two busy
#: processes: 60.2 s at nice 15, 31.5 s at 0, the same KPIs; on a quiet machine 25.3 / 22.8 s
#: against 25.9 / 22.0 s.
RAY_BIDDER_ENV = {"RAY_worker_maximum_startup_concurrency": "64", "RAY_worker_niceness": "0"}

#: Part of the deadline kept for taking the quotes that arrived (fetch, validate, sort).
CLOSE_MARGIN_S = 0.02

#: How many times a cancel is sent before its lines are left to end by themselves.
MAX_CANCEL_SENDS = 3

#: How soon a bidder that was restarting is asked again what it committed.
DOUBT_RETRY_S = 0.2

#: A commit must reach its bidder within this share of the deadline, or the bidder
#: refuses it (and releases the hold): the rest of the deadline is for the ack's way back.
COMMIT_WINDOW = 0.8


def _one_at_a_time(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(self: BidderProcess, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class BidderProcess(BidderHost):
    """A `BidderHost` in its own Ray worker, answering Ray calls and its channels
    (`runtime.channel`) one call at a time.

    Full-collection pauses are bounded (`runtime.gc_pauses`): an 80 ms collection of the
    worker's imports would otherwise eat a third of a round's deadline at random.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.RLock()
        super().__init__(*args, **kwargs)
        self._channels = ChannelServer(lambda method, args: getattr(self, method)(*args))
        bound_gc_pauses()

    def open_channel(self, node_id: str) -> tuple[str, bytes] | None:
        """Where the auctioneer on `node_id` connects its channel (None: this actor is on another node)."""
        return self._channels.open(node_id, self._node_id())

    def state(self) -> dict[str, Any]:
        """`BidderHost.state`, plus how many calls came over channels."""
        return {**super().state(), "channel_calls": self._channels.served}


for _name, _method in inspect.getmembers(BidderProcess, inspect.isfunction):
    if not _name.startswith("_"):  # Ray's thread and the channels' threads take turns
        setattr(BidderProcess, _name, _one_at_a_time(_method))


@dataclass
class RoundFacts:
    """What happened to the bidders of one round."""

    round_id: int
    asked: int = 0
    received: int = 0  # valid quotes
    no_quote: int = 0  # answered, with nothing to offer
    timed_out: int = 0
    failed: int = 0  # the actor died, or quoting raised
    invalid: int = 0  # garbage, dropped by validation
    quarantined: int = 0  # not asked: quarantined
    skipped: int = 0  # not asked: cannot reach any order of the round (prefilter)
    refused: int = 0  # awarded orders whose commit was refused or never confirmed
    close_ms: float = 0.0  # broadcast until the quotes were taken
    busy_ms: float = 0.0  # the slowest answering bidder's own time in the call
    invalid_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Health:
    fails: int = 0
    status: str = "ok"  # ok | quarantined | probing
    until: int = 0  # quarantined until this round counter
    probe: Any = None
    probe_since: int = 0


@dataclass
class _Asked:
    """Who was asked for a round and whose quote was taken."""

    facts: RoundFacts
    asked: list[str]
    accepted: set[str] = field(default_factory=set)


@dataclass
class _Doubt:
    """Commits a bidder has not confirmed: the question out to it (None while it restarts)."""

    ref: Any
    aid: str
    round_ids: list[int]
    give_up: float
    ask_at: float = 0.0


@dataclass
class _Flight:
    """A broadcast sent and not yet received."""

    start: float
    rounds: list[Round]
    facts: list[RoundFacts]
    asked: list[str]
    calls: dict[Any, tuple[str, list[Settle], bool]]


@dataclass
class Exchange:
    """Result of a pipelined call: quotes per new round, and rounds whose commits are settled.

    `confirmed[round_id]` is the set of order indices whose commit was refused (empty
    when every winner committed).
    """

    quotes: dict[int, list[Quote]] = field(default_factory=dict)
    confirmed: dict[int, set[int]] = field(default_factory=dict)


def wire_round(rnd: Round) -> Round:
    """The round as bidders receive it: every array, but not the `Order` objects.

    Bidders quote from the round's arrays only (`size` is kept); unpickling 64 `Order`
    objects in every actor cost about 0.7 ms per actor per round, the arrays 0.04 ms.
    """
    return dataclasses.replace(rnd, orders=(None,) * rnd.size)  # type: ignore[arg-type]


#: Rounds whose pickle is at most this size travel inside each bidder's call; larger ones
#: are put once in the object store (Ray would otherwise put an argument over its 100 KiB
#: inline limit once per call). Inline, a 25-bidder broadcast of a 12-order round cost
#: about a quarter less CPU than through the object store (`python -m bench.ray_bench
#: --round-transport`).
INLINE_ROUNDS_MAX_BYTES = 64 * 1024


def pickle_rounds(rounds: list[Round]) -> bytes:
    """The rounds as every bidder receives them (`wire_round`), pickled once for the whole broadcast."""
    return pickle.dumps([wire_round(r) for r in rounds], protocol=pickle.HIGHEST_PROTOCOL)


def pack_rounds(rounds: list[Round]) -> bytes | ray.ObjectRef:
    """`pickle_rounds` as a Ray call carries it: the bytes, or an object-store reference when large."""
    return _Payload(rounds).to(None)


class _Payload:
    """A broadcast's rounds, pickled once: the bytes for channels, and for Ray calls the
    bytes or (when large, made once) an object-store reference (`pack_rounds`)."""

    def __init__(self, rounds: list[Round]) -> None:
        self.blob = pickle_rounds(rounds)
        self._ref: ray.ObjectRef | None = None

    def to(self, caller: Any) -> bytes | ray.ObjectRef:
        if isinstance(caller, Channel) or len(self.blob) <= INLINE_ROUNDS_MAX_BYTES:
            return self.blob
        if self._ref is None:
            self._ref = ray.put(self.blob)
        return self._ref


def spawn_bidders(
    specs: list[AgentSpec],
    *,
    state_dir: str | None = None,
    faults: Mapping[str, Fault] | None = None,
    options: Mapping[str, Any] | None = None,
    per_agent: Mapping[str, Mapping[str, Any]] | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Starts one bidder actor per spec; returns handles by agent id (in spec order).

    Args:
        state_dir: per-run folder for the agents' snapshots (None: no recovery).
        faults: fault to inject per agent id (tests).
        options: Ray actor options for all (defaults: `num_cpus=0`, `max_restarts=10`).
        per_agent: extra actor options per agent id (e.g. a node affinity).
        wait: block until every actor answers a ping.
    """
    cls = bidder_actor_class(BidderProcess, **(options or {}))
    handles = {}
    for spec in specs:
        extra = dict((per_agent or {}).get(spec.agent_id, {}))
        h = cls.options(**extra) if extra else cls
        handles[spec.agent_id] = h.remote(spec, state_dir, (faults or {}).get(spec.agent_id))
    if wait:
        ray.get([h.ping.remote() for h in handles.values()])
    return handles


class RayBidders:
    """The fleet's bidder actors behind the engine's `Bidders` seam.

    Args:
        fleet: the in-driver fleet; only its static facts are used (ids, kinds, sites,
            reach for the prefilter); the live agents are the actors.
        handles: actor handle per agent id (every fleet agent must have one).
        deadline_s: wall-clock time a round waits for quotes.
        settle_timeout_s: how long `settle` waits for commit acks (default: deadline_s).
        quarantine_after: consecutive failures (late, dead, garbage) before quarantine.
        quarantine_rounds: rounds a quarantined bidder sits out before a probe.
        prefilter: do not ask bidders that cannot reach any order of the round (their
            quote would be empty). Saves calls; off by default because a bidder that is
            not called does not advance its clock, which moves utilization figures.
        doubt_timeout_s: how long to wait for a bidder whose call carrying commits was
            lost to say what it committed; after that its orders go back to the queue.
        channels: carry the rounds and settles to bidders on this node over direct
            channels (`runtime.channel`) instead of Ray calls: a round's broadcast took
            about a third of the CPU (`python -m bench.ray_bench --round-transport`).
            Bidders on other nodes, and any whose channel broke until it is reopened,
            use Ray calls. Default: on, unless `BIDHIVE_CHANNELS=0`.
    """

    def __init__(
        self,
        fleet: Fleet,
        handles: Mapping[str, Any],
        *,
        deadline_s: float = 0.5,
        settle_timeout_s: float | None = None,
        quarantine_after: int = 3,
        quarantine_rounds: int = 10,
        prefilter: bool = False,
        doubt_timeout_s: float = 60.0,
        keep_facts: int = 100_000,
        channels: bool | None = None,
    ) -> None:
        self.fleet = fleet
        self.ids = [a.agent_id for a in fleet.agents]
        missing = [i for i in self.ids if i not in handles]
        if missing:
            raise ValueError(f"no actor for bidders: {', '.join(missing)}")
        self.handles = dict(handles)
        self.kinds: dict[str, Kind] = fleet.kinds
        self.site_ids = fleet.sources.ids
        self.deadline_s = deadline_s
        self.settle_timeout_s = deadline_s if settle_timeout_s is None else settle_timeout_s
        self.quarantine_after = quarantine_after
        self.quarantine_rounds = quarantine_rounds
        self.prefilter = prefilter
        self.doubt_timeout_s = doubt_timeout_s
        self.health = {i: _Health() for i in self.ids}
        self.facts: deque[RoundFacts] = deque(maxlen=keep_facts)
        self.totals: Counter[str] = Counter()
        self.rounds_seen = 0
        self._asked: dict[int, _Asked] = {}
        self._stray: list[Any] = []
        # pipelined protocol
        self._pending: dict[str, list[Settle]] = {}
        self._awaiting: dict[int, dict[str, set[int]]] = {}
        self._refused: dict[int, set[int]] = {}
        self._confirmed: dict[int, set[int]] = {}
        self._doubts: list[_Doubt] = []
        self._committed: dict[int, dict[str, set[int]]] = {}
        self._refusers: dict[int, list[str]] = {}
        #: committed lines per bidder for orders whose other side refused and that its
        #: cancel has not undone (yet); see `_commit_done`
        self.orphaned: Counter[str] = Counter()
        self._settle_now: dict[int, float] = {}  # market time of each round awaiting commit acks
        self._refusals: dict[int, Refusal] = {}  # per round with a refused award, until journaled
        self._cancel_sends: Counter[tuple[str, int]] = Counter()
        self.channels: dict[str, Channel] = {}
        self.channel_events: Counter[str] = Counter()  # opened, broken (for metrics)
        self._reopening: dict[str, Any] = {}  # agent id -> its `open_channel` Ray call
        self._reopen_at: dict[str, float] = {}
        if channels is None:
            channels = os.environ.get("BIDHIVE_CHANNELS", "1") != "0"
        self._node = ray.get_runtime_context().get_node_id() if channels else ""
        if channels:
            self._connect({aid: self.handles[aid].open_channel.remote(self._node) for aid in self.ids}, 60.0)

    @classmethod
    def spawn(cls, fleet: Fleet, strategy: str, *, seed: int, state_dir: str | None = None,
              faults: Mapping[str, Fault] | None = None, options: Mapping[str, Any] | None = None,
              **kw: Any) -> RayBidders:
        """Starts an actor per fleet agent (built as `build_fleet(fleet.cfg, seed)` would) and wraps them."""
        specs = fleet_specs(fleet.cfg, seed, strategy)
        return cls(fleet, spawn_bidders(specs, state_dir=state_dir, faults=faults, options=options), **kw)

    # -- channels ----------------------------------------------------------------------------
    def _connect(self, opening: Mapping[str, Any], timeout_s: float) -> None:
        """Connects the channels whose `open_channel` calls answered within `timeout_s`."""
        ready, _ = ray.wait(list(opening.values()), num_returns=len(opening), timeout=timeout_s)
        done = set(ready)
        for aid, ref in opening.items():
            if ref not in done:
                continue
            try:
                endpoint = ray.get(ref)
                if endpoint is not None:  # None: the bidder is on another node
                    self.channels[aid] = Channel.connect(endpoint, aid)
                    self.channel_events["opened"] += 1
            except (RayError, OSError, EOFError) as err:
                logger.warning("bidder %s: no channel (%s: %s); using Ray calls", aid, type(err).__name__, err)

    def _caller(self, aid: str) -> Any:
        """What to call bidder `aid` through: its channel, or its Ray handle."""
        ch = self.channels.get(aid)
        if ch is None:
            return self.handles[aid]
        if not ch.broken:
            return ch
        del self.channels[aid]  # its actor died: Ray restarts it, and the channel is asked for again
        self.channel_events["broken"] += 1
        self._reopen_at[aid] = time.monotonic() + DOUBT_RETRY_S
        return self.handles[aid]

    def _reopen(self) -> None:
        """Reconnects broken channels.

        Every Ray call made to the bidder before its `open_channel` call has run when that
        answers. Calls made through Ray while it was pending may still run after the first
        calls on the new channel; they belong to other rounds, and holds and commits are
        kept per round, so the order between them changes what the bidder quotes, never
        what it commits.
        """
        now = time.monotonic()
        for aid, at in list(self._reopen_at.items()):
            if now >= at:
                del self._reopen_at[aid]
                self._reopening[aid] = self.handles[aid].open_channel.remote(self._node)
        if self._reopening:
            ready, _ = ray.wait(list(self._reopening.values()), num_returns=len(self._reopening), timeout=0)
            done = set(ready)
            answered = {aid: ref for aid, ref in self._reopening.items() if ref in done}
            for aid in answered:
                del self._reopening[aid]
            self._connect(answered, 0.0)
            for aid in answered:
                if aid not in self.channels:
                    self._reopen_at[aid] = now + 1.0  # restarting, or gone: ask again later

    # -- selection, quarantine and probes ------------------------------------------------
    def _select(self, rounds: list[Round], facts: list[RoundFacts]) -> list[str]:
        """Bidders to ask, in fleet order; counts the quarantined and the skipped."""
        reach = self._reachable(rounds) if self.prefilter and rounds else None
        asked = []
        for k, aid in enumerate(self.ids):
            if not self._admitted(aid):
                for f in facts:
                    f.quarantined += 1
                continue
            if reach is not None and not reach[k]:
                for f in facts:
                    f.skipped += 1
                continue
            asked.append(aid)
        return asked

    def _reachable(self, rounds: list[Round]) -> list[bool]:
        # `_reach` depends only on an agent's config (area, consent, parcel size), so the
        # driver's copy answers exactly as the actor's agent would
        out = []
        for a in self.fleet.agents:
            out.append(any(bool((a.category_ok[r.category] & a._reach(r)).any()) for r in rounds))
        return out

    def _admitted(self, aid: str) -> bool:
        h = self.health[aid]
        if h.status == "ok":
            return True
        if h.status == "quarantined":
            if self.rounds_seen < h.until:
                return False
            h.status, h.probe, h.probe_since = "probing", self._caller(aid).ping.remote(), self.rounds_seen
            return False
        ready, _ = channel.wait([h.probe], timeout=0)
        if not ready:
            if self.rounds_seen - h.probe_since >= self.quarantine_rounds:
                self._quarantine(aid, "probe unanswered")
            return False
        try:
            channel.get(h.probe)
        except RayError as err:
            self._quarantine(aid, f"probe failed ({type(err).__name__})")
            return False
        logger.warning("bidder %s re-admitted after a successful probe", aid)
        self.totals["readmitted"] += 1
        self.health[aid] = _Health()
        return True

    def _quarantine(self, aid: str, why: str) -> None:
        h = self.health[aid]
        h.status, h.until, h.probe = "quarantined", self.rounds_seen + self.quarantine_rounds, None
        self.totals["quarantined"] += 1
        logger.warning("bidder %s quarantined for %d rounds: %s", aid, self.quarantine_rounds, why)

    def _failed(self, aid: str, why: str) -> None:
        h = self.health[aid]
        h.fails += 1
        logger.info("bidder %s: %s (%d in a row)", aid, why, h.fails)
        if h.status == "ok" and h.fails >= self.quarantine_after:
            self._quarantine(aid, f"{h.fails} failures in a row, last: {why}")

    def quarantined(self) -> list[str]:
        """Bidders currently not asked (quarantined or waiting for their probe)."""
        return [i for i in self.ids if self.health[i].status != "ok"]

    # -- one broadcast ---------------------------------------------------------------------
    def _broadcast(self, rounds: list[Round], now: float, hold_ttl_s: float,
                   settle_only: set[str] | None = None) -> tuple[dict[int, list[Quote]], list[RoundFacts]]:
        """One call per bidder carrying pending settles and the rounds; returns valid quotes per round.

        With no rounds, `settle_only` limits the call to those bidders' pending settles.
        """
        return self._receive(self._send(rounds, now, hold_ttl_s, settle_only))

    def _send(self, rounds: list[Round], now: float, hold_ttl_s: float,
              settle_only: set[str] | None = None) -> _Flight:
        """Puts the rounds once and makes one call per bidder asked or owed a settle."""
        start = time.perf_counter()
        self._reap()
        self._reopen()
        self._resolve_doubts()
        expires = time.time() + self.deadline_s * COMMIT_WINDOW
        facts = [RoundFacts(r.round_id) for r in rounds]
        self.rounds_seen += len(rounds)
        asked = self._select(rounds, facts) if rounds else []
        asked_set = set(asked)
        for f in facts:
            f.asked = len(asked)
            self._asked[f.round_id] = _Asked(f, asked)
        payload = _Payload(rounds) if rounds else None
        calls: dict[Any, tuple[str, list[Settle], bool]] = {}
        for aid in self.ids:
            if settle_only is not None and aid not in settle_only:
                continue
            settles = [dataclasses.replace(m, expires_at=expires) for m in self._pending.pop(aid, [])]
            if aid in asked_set or settles:
                to = self._caller(aid)
                if payload is not None and aid in asked_set:
                    call = to.exchange_rounds.remote(settles, now, hold_ttl_s, payload.to(to))
                else:
                    call = to.exchange.remote(settles, now, hold_ttl_s)
                calls[call] = (aid, settles, aid in asked_set)
        return _Flight(start, rounds, facts, asked, calls)

    def _receive(self, flight: _Flight) -> tuple[dict[int, list[Quote]], list[RoundFacts]]:
        """Waits until the flight's deadline, then validates and books what arrived."""
        start, rounds, facts, asked, calls = flight.start, flight.rounds, flight.facts, flight.asked, flight.calls
        # stop waiting a little early: fetching, validating and sorting what arrived is part of the round
        margin = min(CLOSE_MARGIN_S, 0.1 * self.deadline_s)
        timeout = max(0.0, self.deadline_s - margin - (time.perf_counter() - start))
        ready, late = channel.wait(list(calls), timeout=timeout)
        replies: dict[str, Reply | BaseException | None] = {calls[r][0]: None for r in late}
        for ref in ready:
            try:
                replies[calls[ref][0]] = channel.get(ref)
            except RayError as err:
                replies[calls[ref][0]] = err
        self._stray.extend(late)
        quotes: dict[int, list[Quote]] = {r.round_id: [] for r in rounds}
        shapes = [RoundShape(r.size, self.site_ids, self.kinds) for r in rounds]
        for ref, (aid, settles, was_asked) in calls.items():
            reply = replies[aid]
            self._settled(aid, settles, reply)
            if not was_asked:
                continue
            if reply is None:
                for f in facts:
                    f.timed_out += 1
                self._failed(aid, f"timed out after {self.deadline_s * 1000:.0f} ms")
                continue
            if isinstance(reply, BaseException):
                for f in facts:
                    f.failed += 1
                self._failed(aid, f"call failed: {type(reply).__name__}")
                continue
            bad = ""
            for k, rnd in enumerate(rounds):
                f = facts[k]
                raw = reply.quotes[k] if k < len(reply.quotes) else None
                err = reply.errors[k] if k < len(reply.errors) else "missing"
                if err:
                    f.failed += 1
                    bad = f"quoting raised {err}"
                    continue
                if raw is None:
                    f.no_quote += 1
                    continue
                q, reason = validate_quote(raw, aid, shapes[k])
                if q is None:
                    f.invalid += 1
                    f.invalid_reasons[reason] = f.invalid_reasons.get(reason, 0) + 1
                    bad = f"invalid quote ({reason})"
                    continue
                f.received += 1
                quotes[rnd.round_id].append(q)
                self._asked[rnd.round_id].accepted.add(aid)
            if bad:
                self._failed(aid, bad)
            else:
                self.health[aid].fails = 0
        for f in facts:
            for key in ("asked", "received", "no_quote", "timed_out", "failed", "invalid", "quarantined", "skipped"):
                self.totals[key] += getattr(f, key)
            self.facts.append(f)
        pos = {aid: i for i, aid in enumerate(self.ids)}
        for rnd in rounds:  # fleet order, so clearing sees what the in-process run sees
            quotes[rnd.round_id].sort(key=lambda q: pos[q.agent_id])
        close_ms = (time.perf_counter() - start) * 1000.0
        busy = max((r.busy_ms for r in replies.values() if isinstance(r, Reply)), default=0.0)
        for f in facts:
            f.close_ms, f.busy_ms = close_ms, busy
        return quotes, facts

    def _settled(self, aid: str, settles: list[Settle], reply: Reply | BaseException | None) -> None:
        """Books the acks of settle messages that rode on a call; a lost call's commits are in doubt."""
        cancels = [s for s in settles if s.cancel]
        if cancels:
            self._cancels_done(aid, cancels, reply)
        commits = [s for s in settles if s.lines]
        if not commits:
            return
        if not isinstance(reply, Reply):
            self._doubt(aid, [s.round_id for s in commits], "late" if reply is None else type(reply).__name__)
            return
        by_round = {a.round_id: a for a in reply.acks}
        for s in commits:
            ack = by_round.get(s.round_id)
            ok = ack is not None and ack.ok
            if not ok:
                logger.info("bidder %s did not commit round %d (%s): %d orders go back to the queue",
                            aid, s.round_id, ack.reason if ack else "no ack", len(s.lines or ()))
                self._refusers.setdefault(s.round_id, []).append(aid)
            self._commit_done(s.round_id, aid, ok)

    def _cancels_done(self, aid: str, cancels: list[Settle], reply: Reply | BaseException | None) -> None:
        """Books what the cancels undid; a lost call's cancels go again (a cancel is idempotent)."""
        if isinstance(reply, Reply):
            undone = {a.round_id: a.cancelled for a in reply.acks}
            for s in cancels:
                self._cancel_sends.pop((aid, s.round_id), None)
                n = undone.get(s.round_id, 0)
                self.orphaned[aid] -= n
                self.totals["cancelled_lines"] += n
            self.orphaned += Counter()  # drops the bidders with nothing left orphaned
            return
        for s in cancels:
            key = (aid, s.round_id)
            self._cancel_sends[key] += 1
            if self._cancel_sends[key] < MAX_CANCEL_SENDS:
                self._pending.setdefault(aid, []).append(s)
            else:
                del self._cancel_sends[key]
                logger.warning("bidder %s: cancel of %d line(s) of round %d lost %d times; they stay committed "
                               "until their jobs end", aid, len(s.cancel), s.round_id, MAX_CANCEL_SENDS)

    def _doubt(self, aid: str, round_ids: list[int], why: str) -> None:
        """A call carrying commits was lost (late, or the actor died): ask the bidder what it did.

        The question queues behind the lost call (or waits for the restart, which reloads
        the snapshot), so the answer is what the bidder's state really holds: an order is
        counted as awarded exactly when its winner committed it.
        """
        logger.info("bidder %s: commits for rounds %s in doubt (%s); asking", aid, round_ids, why)
        ref = self._caller(aid).commit_status.remote(round_ids)
        self._doubts.append(_Doubt(ref, aid, round_ids, time.monotonic() + self.doubt_timeout_s))

    def _resolve_doubts(self, wait_s: float = 0.0) -> None:
        """Takes the bidders' answers about commits in doubt (waiting up to `wait_s` for them).

        A bidder that is restarting cannot answer yet (`ActorUnavailableError`); it is asked
        again after `DOUBT_RETRY_S`, because its snapshot holds the commits it made before
        it went down. Only a bidder gone for good, or silent past `doubt_timeout_s`, has
        its orders go back to the queue.
        """
        if not self._doubts:
            return
        for d in self._doubts:
            if d.ref is None and time.monotonic() >= d.ask_at:
                d.ref = self._caller(d.aid).commit_status.remote(d.round_ids)
        refs = [d.ref for d in self._doubts if d.ref is not None]
        if refs:
            ready, _ = channel.wait(refs, timeout=wait_s)
        else:  # all restarting: wait for the next question, within wait_s
            ready = []
            time.sleep(min(wait_s, max(0.0, min(d.ask_at for d in self._doubts) - time.monotonic())))
        done = set(ready)
        keep = []
        for d in self._doubts:
            if d.ref is not None and d.ref in done:
                try:
                    status = channel.get(d.ref)
                except RayError as err:
                    restarting = isinstance(err, (ray.exceptions.ActorUnavailableError, ChannelBroken))
                    if restarting and time.monotonic() < d.give_up:  # its snapshot will answer soon
                        keep.append(dataclasses.replace(d, ref=None, ask_at=time.monotonic() + DOUBT_RETRY_S))
                        continue
                    status = {}  # gone for good: nothing it held survives
                    logger.warning("bidder %s cannot say what it committed (%s)", d.aid, type(err).__name__)
            elif time.monotonic() > d.give_up:
                status = {}
                logger.warning("bidder %s did not say what it committed within %.0f s; its orders go back "
                               "to the queue", d.aid, self.doubt_timeout_s)
                if d.ref is not None:
                    self._stray.append(d.ref)
            else:
                keep.append(d)
                continue
            for rid in d.round_ids:
                ok = bool(status.get(rid))
                if not ok:
                    logger.info("bidder %s did not commit round %d: its orders go back to the queue", d.aid, rid)
                    self._refusers.setdefault(rid, []).append(d.aid)
                self._commit_done(rid, d.aid, ok)
        self._doubts = keep

    def _commit_done(self, round_id: int, aid: str, ok: bool) -> None:
        waiting = self._awaiting.get(round_id)
        if waiting is None or aid not in waiting:
            return
        lines = waiting.pop(aid)
        if ok:
            self._committed.setdefault(round_id, {})[aid] = lines
        else:
            self._refused.setdefault(round_id, set()).update(lines)
        if not waiting:
            del self._awaiting[round_id]
            refused = self._refused.pop(round_id, set())
            self._confirmed[round_id] = refused
            self._count_refused(round_id, refused)
            now = self._settle_now.pop(round_id, 0.0)
            cancelled: dict[str, list[int]] = {}
            for partner, orders in self._committed.pop(round_id, {}).items():
                orphaned = tuple(sorted(orders & refused))
                if orphaned:  # its partner refused: this bidder holds a job nobody will hand it
                    self.orphaned[partner] += len(orphaned)
                    self.totals["orphaned_lines"] += len(orphaned)
                    self._pending.setdefault(partner, []).append(Settle(round_id, None, now, cancel=orphaned))
                    cancelled[partner] = list(orphaned)
            refusers = self._refusers.pop(round_id, [])
            if refused:  # one line per round, whatever the number of bidders involved
                self._refusals[round_id] = Refusal(sorted(set(refusers)), cancelled)
                orphans = ", ".join(f"{partner} x{len(lines)}" for partner, lines in cancelled.items())
                logger.warning("round %d: %d awarded order(s) go back to the queue: commit refused or lost by %s%s",
                               round_id, len(refused), ", ".join(refusers),
                               f"; cancelling their partner's line: {orphans}" if orphans else "")

    def _count_refused(self, round_id: int, refused: set[int]) -> None:
        if refused:
            self.totals["refused"] += len(refused)
            for f in reversed(self.facts):
                if f.round_id == round_id:
                    f.refused += len(refused)
                    break

    def _reap(self) -> None:
        """Collects finished fire-and-forget and late calls (their results are of no use now)."""
        if not self._stray:
            return
        done, self._stray = channel.wait(self._stray, timeout=0)
        for ref in done:
            try:
                channel.get(ref)
            except RayError:
                pass

    def _settle_messages(self, round_id: int, awards: dict[str, list[AwardLine]], quoted: Iterable[str],
                         now: float) -> dict[str, Settle]:
        """Commit for winners, release for every other bidder asked (late and invalid ones too)."""
        ctx = self._asked.pop(round_id, None)
        everyone = set(quoted) | set(ctx.asked if ctx else ())
        return {aid: Settle(round_id, awards.get(aid) or None, now) for aid in self.ids if aid in everyone}

    # -- the engine's Bidders protocol ---------------------------------------------------------
    def quote_all(self, rnd: Round, now: float, hold_ttl_s: float) -> list[Quote]:
        """Every valid quote that arrived by the deadline, in fleet order."""
        quotes, _ = self._broadcast([rnd], now, hold_ttl_s)
        return quotes[rnd.round_id]

    def settle(self, round_id: int, awards: dict[str, list[AwardLine]], quoted: list[str], now: float) -> set[int]:
        """Winners commit (acks awaited), the rest release; returns the orders whose commit failed."""
        msgs = self._settle_messages(round_id, awards, quoted, now)
        expires = time.time() + self.settle_timeout_s * COMMIT_WINDOW
        commits = {}
        for aid, m in msgs.items():
            if m.lines:
                m = dataclasses.replace(m, expires_at=expires)
            ref = self._caller(aid).settle.remote([m])
            if m.lines:
                commits[ref] = (aid, m)
            else:
                self._stray.append(ref)
        if commits:
            self._awaiting[round_id] = {aid: {line.order_idx for line in m.lines or ()} for aid, m in commits.values()}
            self._settle_now[round_id] = now
            ready, late = channel.wait(list(commits), timeout=self.settle_timeout_s)
            for ref in commits:
                aid, m = commits[ref]
                try:
                    reply: Reply | BaseException | None = Reply(aid, acks=channel.get(ref)) if ref in ready else None
                except RayError as err:
                    reply = err
                self._settled(aid, [m], reply)
            while self._doubts:
                self._resolve_doubts(wait_s=1.0)
        else:
            self._confirmed[round_id] = set()
        return self._confirmed.pop(round_id)

    # -- the pipelined protocol (auctioneer) ------------------------------------------------------
    def exchange(self, rounds: list[Round], now: float, hold_ttl_s: float) -> Exchange:
        """Delivers pending settles and asks for the rounds' quotes in one call per bidder."""
        return self.receive(self.send(rounds, now, hold_ttl_s))

    def send(self, rounds: list[Round], now: float, hold_ttl_s: float) -> _Flight:
        """The first half of `exchange`: the calls go out; `receive` collects them at the deadline.

        Lets the auctioneer clear earlier rounds while the bidders quote these.
        """
        return self._send(rounds, now, hold_ttl_s)

    def receive(self, flight: _Flight) -> Exchange:
        """The second half of `exchange`."""
        quotes, _ = self._receive(flight)
        confirmed, self._confirmed = self._confirmed, {}
        return Exchange(quotes, confirmed)

    def defer_settle(self, round_id: int, awards: dict[str, list[AwardLine]], quoted: list[str], now: float) -> None:
        """Queues a round's commits and releases for the next call to each bidder."""
        msgs = self._settle_messages(round_id, awards, quoted, now)
        waiting: dict[str, set[int]] = {}
        for aid, s in msgs.items():
            self._pending.setdefault(aid, []).append(s)
            if s.lines:
                waiting[aid] = {line.order_idx for line in s.lines}
        if waiting:
            self._awaiting[round_id] = waiting
            self._settle_now[round_id] = now
        else:
            self._confirmed[round_id] = set()

    def flush(self, now: float, commits_only: bool = False) -> dict[int, set[int]]:
        """Delivers pending settles now (no new round); returns the rounds this confirmed.

        `commits_only` calls just the bidders with a commit (a round's winners) or a cancel
        waiting; the others' releases keep riding on their next call.
        """
        if self._pending:
            only = {a for a, msgs in self._pending.items() if any(m.lines or m.cancel for m in msgs)} \
                if commits_only else None
            if only is None or only:
                self._broadcast([], now, 0.0, settle_only=only)
        if self._doubts:
            self._resolve_doubts(wait_s=self.deadline_s)
        confirmed, self._confirmed = self._confirmed, {}
        return confirmed

    @property
    def unsettled(self) -> bool:
        """Settle messages not yet delivered, or commits not yet acknowledged."""
        return bool(self._pending or self._awaiting or self._confirmed or self._doubts)

    # -- state --------------------------------------------------------------------------------------
    def utilization(self, now: float) -> list[tuple[Kind, float]]:
        """Per-agent utilization from the actors (0 for a bidder that cannot answer)."""
        refs = [self.handles[i].utilization.remote(now) for i in self.ids]
        out = []
        for aid, ref in zip(self.ids, refs):
            try:
                kind, u = ray.get(ref, timeout=30)
                out.append((Kind(kind), float(u)))
            except (RayError, TimeoutError) as err:
                logger.warning("bidder %s: no utilization (%s); counted as 0", aid, type(err).__name__)
                out.append((self.kinds[aid], 0.0))
        return out

    def states(self, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Each actor's capacity facts (`BidderHost.state`)."""
        refs = {i: self.handles[i].state.remote() for i in self.ids}
        return {i: ray.get(r, timeout=timeout_s) for i, r in refs.items()}

    def summary(self) -> dict[str, Any]:
        """Totals over all rounds, for logs and reports."""
        return {"rounds": self.rounds_seen, **dict(sorted(self.totals.items())), "quarantined_now": self.quarantined()}

    def ping(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """Which bidder actors answer a ping within `timeout_s` (for health checks)."""
        refs = {self.handles[i].ping.remote(): i for i in self.ids}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        alive = dict.fromkeys(self.ids, False)
        for ref in done:
            try:
                ray.get(ref, timeout=0)
                alive[refs[ref]] = True
            except (RayError, TimeoutError):
                pass
        return alive

    def round_facts(self, round_id: int) -> dict[str, int]:
        """One recent round's bidder counts, journaled with its result (empty if unknown)."""
        for f in reversed(self.facts):
            if f.round_id == round_id:
                return {"asked": f.asked, "quoted": f.received, "timed_out": f.timed_out, "failed": f.failed,
                        "invalid": f.invalid, "skipped": f.skipped + f.quarantined}
        return {}

    def refusal(self, round_id: int) -> Refusal | None:
        """Who refused a round's commits and whose lines were cancelled, once (for its journal record)."""
        return self._refusals.pop(round_id, None)

    def last_facts(self, n: int = 1) -> list[dict[str, Any]]:
        """The last n rounds' facts as dicts."""
        return [asdict(f) for f in list(self.facts)[-n:]]

    def kill_all(self) -> None:
        """Kills every bidder actor (no restart)."""
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()
        for h in self.handles.values():
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


@contextlib.contextmanager
def ray_simulation(strategy: str, seed: int, *, deadline_s: float = 10.0) -> Iterator[Callable[[Fleet, Any], RayBidders]]:
    """Local (or `RAY_ADDRESS`) Ray around a simulation: yields the `bidders=` factory for `Simulator`.

    Starts Ray through `runtime.local_ray` (loopback only, token auth, temp dir removed
    on exit), one bidder actor per fleet agent with snapshots in a per-run temp dir, and
    shuts everything down afterwards. The deadline is generous: a simulation compares
    with the in-process run, so a bidder should only be absent when it really failed.
    Logs go through Python logging (`bidhive.ray`, WARNING unless `BIDHIVE_LOG` says
    otherwise): which bidder timed out, failed, was quarantined or re-admitted.
    """
    from runtime.local_ray import local_ray

    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("BIDHIVE_LOG", "WARNING").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    made: list[RayBidders] = []

    def factory(fleet: Fleet, policy: Any) -> RayBidders:
        rb = RayBidders.spawn(fleet, strategy, seed=seed, state_dir=state, deadline_s=deadline_s)
        logger.info("started %d bidder actors", len(rb.handles))
        made.append(rb)
        return rb

    with local_ray(extra_env=RAY_BIDDER_ENV), \
            tempfile.TemporaryDirectory(prefix="bidhive-state-", dir=default_state_root()) as state:
        try:
            yield factory
        finally:
            for rb in made:
                logger.info("bidders: %s", rb.summary())
                rb.kill_all()
