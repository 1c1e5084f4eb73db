"""Per-order views built from journal records: the one source the HTTP answers come from.

The live service feeds every record the journal writes into `OrderIndex.apply`; after a
restart the same method reads the journal back. So `GET /orders/{id}` and a repeated
`Idempotency-Key` answer the same before and after a restart, and nothing the client
was told exists outside the journal.

An order is ``awarded`` once the round that chose it has journaled its hold commits
(the service answers only then), ``unfulfilled`` once a round left it unserved on its
last allowed attempt (an award whose commit was refused counts as unserved) or the
service dropped it (``order_dropped``: its rounds kept failing), and ``pending`` otherwise.

A service runs for days, so the index keeps what it holds bounded: an ended order stays a
live view for the next `HOT_ENDED` ended orders (the records of its round come within a
few rounds), then moves to an `OrderArchive` (compressed), and past `retain` ended orders
it is forgotten, its idempotency key with it. The same records give the same index, so a
restart forgets exactly what the live service had forgotten.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from market.book import QuoteColumns
from market.engine import COMMIT_REFUSED
from market.replay import bidders_by_order, quote_columns
from serve.order_archive import ArchiveState, OrderArchive

PENDING, AWARDED, UNFULFILLED = "pending", "awarded", "unfulfilled"
_OPEN_ROUNDS_KEPT = 4096  # rounds whose hold records may still come (they follow within a few rounds)
HOT_ENDED = 4096  # ended orders kept as live views before they are archived
ANSWER_FIELDS = ("order_id", "status", "reason", "award", "auction")  # `OrderView.answer`'s keys


@dataclass
class OrderView:
    """One order as the API shows it."""

    order_id: str
    order: dict[str, Any]
    key: str | None = None
    body_hash: str | None = None
    status: str = PENDING
    reason: str | None = None
    award: dict[str, Any] | None = None
    auction: dict[str, Any] | None = None
    attempts: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    _round: int | None = None  # the round it is in (this segment's id), None between rounds
    _chosen: dict[str, Any] | None = None  # the award of its round, until the commits are journaled

    @property
    def ended(self) -> bool:
        """Awarded or unfulfilled for good."""
        return self.status != PENDING

    def answer(self) -> dict[str, Any]:
        """The `POST /orders` body (an `OrderOut`)."""
        return {k: getattr(self, k) for k in ANSWER_FIELDS}

    def detail(self) -> dict[str, Any]:
        """The `GET /orders/{id}` body: the answer, the order and its timeline."""
        return {**self.answer(), "attempts": self.attempts, "order": self.order, "events": self.events}

    def snapshot(self) -> OrderView:
        """A copy later records leave alone. They append events and rebind fields; no dict
        a view holds, and no event, is changed in place. So only the event list is copied."""
        twin = object.__new__(OrderView)  # a quarter of the time `__init__` takes; 4,096 of them are taken at once
        twin.__dict__.update(self.__dict__)
        twin.events = list(self.events)
        return twin


_ORDER_FIELDS = ("customer_id", "tier", "channel", "items", "lat", "lon", "created_s", "promise_s", "value",
                 "category", "locker_ok", "reserve")


@dataclass(frozen=True)
class IndexState:
    """An index as of one moment, for a checkpoint (`serve.index_checkpoint`).

    Taking it copies containers, not their contents: the records that follow append
    events and rebind a view's fields, but never change a dict or an event in place
    (`OrderView.snapshot`), and the archive's sealed chunks never change.
    """

    views: dict[str, OrderView]  # pending orders and the newest ended ones, as snapshots
    ended: tuple[str, ...]  # the ended ones among them, oldest first
    open_rounds: tuple[tuple[int, list[str]], ...]  # round id -> its order ids, oldest first
    scalars: dict[str, Any]  # counts, settings and the run's facts (`OrderIndex.SCALAR_FIELDS`)
    keys: dict[str, str]
    archive: ArchiveState

    @property
    def settings(self) -> tuple[int | None, int]:
        """`retain` and `hot`: another setting forgets other orders, so the state is only
        good for an index with the same."""
        return self.scalars["retain"], self.scalars["hot"]


def _answer_of(detail: dict[str, Any]) -> dict[str, Any]:
    """The `POST /orders` body inside a `GET /orders/{id}` body."""
    return {k: detail[k] for k in ANSWER_FIELDS}


def _quoted_by_order(quotes: QuoteColumns, n_orders: int) -> list[list[str]]:
    """The bidders whose quote has a row for each order of the round, in quote order."""
    out: list[list[str]] = [[] for _ in range(n_orders)]
    quote_of_row = np.repeat(np.arange(len(quotes)), quotes.rows)
    pairs = np.unique(np.stack((quotes.order_idx, quote_of_row), axis=1), axis=0)
    for o, q in pairs.tolist():
        if 0 <= o < n_orders:
            out[o].append(quotes.agent_ids[q])
    return out


class OrderIndex:
    """Order views, idempotency keys and the run's facts, from journal records in order.

    Args:
        retain: the most ended orders kept answerable (live or archived); None keeps all.
        hot: the ended orders kept as live views before they are archived.
    """

    def __init__(self, retain: int | None = None, hot: int = HOT_ENDED) -> None:
        self.orders: dict[str, OrderView] = {}  # pending orders and the last `hot` ended ones
        self.keys: dict[str, str] = {}  # idempotency key -> order id (kept orders only)
        self.archive = OrderArchive()
        self.retain, self.hot = retain, hot
        self.forgotten = 0
        self._ended: deque[str] = deque()  # ended orders still in `orders`, oldest first
        self.segments = 0
        self.rounds = 0
        self.profile = ""
        self.config: dict[str, Any] = {}
        self._ids: tuple[str, ...] = ()
        self._kinds: list[str] = []
        self._max_attempts = 10
        self._open: OrderedDict[int, list[str]] = OrderedDict()  # round id -> its order ids (this segment)

    SCALAR_FIELDS = ("retain", "hot", "forgotten", "segments", "rounds", "profile", "config", "_ids", "_kinds",
                     "_max_attempts")  # what `state` keeps besides the containers

    def state(self) -> IndexState:
        """This index as of now: a copy of its containers, not of what they hold, so the
        service's round loop waits only for that (16 ms with 120,000 keys kept, most of it
        the live views; `bidhive bench restart`)."""
        return IndexState({oid: v.snapshot() for oid, v in self.orders.items()}, tuple(self._ended),
                          tuple(self._open.items()), {name: getattr(self, name) for name in self.SCALAR_FIELDS},
                          dict(self.keys), self.archive.state())

    @classmethod
    def restored(cls, state: IndexState) -> OrderIndex:
        """The index `state` was taken from, ready for the records that followed it."""
        index = cls()
        for name, value in state.scalars.items():
            setattr(index, name, value)
        index.orders = {oid: view.snapshot() for oid, view in state.views.items()}  # `state` stays as it was
        index._ended, index._open = deque(state.ended), OrderedDict(state.open_rounds)
        index.keys, index.archive = dict(state.keys), OrderArchive.restored(state.archive)
        return index

    # -- records ---------------------------------------------------------------------------
    def apply(self, rec: dict[str, Any]) -> list[str]:
        """Takes one journal record; returns the ids of orders it ended."""
        handler = getattr(self, "_" + str(rec.get("type")), None)
        ended: list[str] = (handler(rec) or []) if handler is not None else []
        if ended:
            self._ended.extend(ended)
            self._cool()
        return ended

    def _cool(self) -> None:
        """Archives the ended views past `hot`, then forgets the archive's oldest past `retain`."""
        while len(self._ended) > self.hot:
            oid = self._ended.popleft()
            view = self.orders.get(oid)
            if view is not None and view.ended:  # a schema-1 journal may have traded it again
                del self.orders[oid]
                self.archive.put(oid, view.key, view.body_hash, view.detail())
        while self.retain is not None and len(self.archive) and len(self.archive) + len(self._ended) > self.retain:
            oid, key = self.archive.pop_oldest()
            if key is not None and self.keys.get(key) == oid:
                del self.keys[key]
            self.forgotten += 1

    def _run_started(self, rec: dict[str, Any]) -> None:
        self.segments += 1
        self._ids = tuple(rec["bidders"]["ids"])
        self._kinds = list(rec["bidders"]["kinds"])
        self.config = dict(rec.get("config") or {})
        self._max_attempts = int(self.config.get("max_attempts", 10))
        self.profile = str(rec.get("profile_name") or "custom")
        self._open.clear()
        for view in self.orders.values():
            view._round = view._chosen = None

    def _order_received(self, rec: dict[str, Any]) -> None:
        oid = rec["order_id"]
        view = self.orders.get(oid)
        if view is None:
            view = self.orders[oid] = OrderView(oid, {k: rec.get(k) for k in _ORDER_FIELDS},
                                                rec.get("idempotency_key"), rec.get("body_hash"))
            if view.key:
                self.keys[view.key] = oid
        view.events.append({"event": "received", "at_s": rec["received_s"], "segment": self.segments})

    def _round_opened(self, rec: dict[str, Any]) -> None:
        rid, oids = int(rec["round_id"]), list(rec["orders"])
        self._open[rid] = oids
        if len(self._open) > _OPEN_ROUNDS_KEPT:
            self._open.popitem(last=False)
        for oid, attempt in zip(oids, rec["attempts"]):
            view = self.orders.get(oid)
            if view is None:
                continue
            if view.status == AWARDED:  # schema-1 journals listed refused awards as committed: traded again
                view.status, view.award = PENDING, None
            view._round, view._chosen, view.attempts = rid, None, int(attempt) + 1
            view.events.append({"event": "round_opened", "round_id": rid, "at_s": rec["opened_s"],
                                "attempt": int(attempt) + 1})

    def _round_cleared(self, rec: dict[str, Any]) -> list[str]:
        rid = int(rec["round_id"])
        oids = self._open.get(rid, [])
        self.rounds += 1
        award_i, award_f = np.asarray(rec["award_i"]), np.asarray(rec["award_f"])
        quoted = _quoted_by_order(quote_columns(rec, self._ids), len(oids))
        facts = dict(rec.get("facts") or {})
        ended: list[str] = []
        for o, oid in enumerate(oids):
            view = self.orders.get(oid)
            if view is None:
                continue
            view.auction = self._auction(rid, facts, len(quoted[o]))
            view.events.append({"event": "quotes", "round_id": rid, "received": len(quoted[o]), "bidders": quoted[o]})
            reason = str(rec["reason"][o])
            if not reason:
                view._chosen = self._award(award_i[:, o], award_f[:, o], view)
                view.events.append({"event": "awarded", "round_id": rid, **view._chosen})
                continue
            view.events.append({"event": "unserved", "round_id": rid, "reason": reason})
            if self._unserved(view, reason):
                ended.append(oid)
        return ended

    def _unserved(self, view: OrderView, reason: str) -> bool:
        """Marks the view unserved in its round; ends it (True) once it is out of attempts."""
        view.reason = reason
        if view.attempts < self._max_attempts:
            return False
        view.status = UNFULFILLED
        view.events.append({"event": "unfulfilled", "reason": reason})
        return True

    def _auction(self, rid: int, facts: dict[str, Any], quotes: int) -> dict[str, Any]:
        return {"round_id": rid, "bidders_asked": int(facts.get("asked", facts.get("bidders", 0))),
                "quotes_received": quotes, "timed_out": int(facts.get("timed_out", 0)),
                "clear_ms": round(float(facts.get("clear_ms", 0.0)), 3)}

    def _award(self, ai: np.ndarray, af: np.ndarray, view: OrderView) -> dict[str, Any]:
        src, leg = int(ai[1]), int(ai[2])
        created = float(view.order.get("created_s") or 0.0)
        return {
            "source": {"agent_id": self._ids[src], "kind": self._kinds[src]},
            "last_mile": {"agent_id": self._ids[leg], "kind": self._kinds[leg]},
            "price": round(float(af[0] + af[1]), 4), "eta_s": round(float(af[3]) - created, 1),
            "score": round(float(af[2]), 4),
        }

    def _hold_committed(self, rec: dict[str, Any]) -> list[str]:
        rid = int(rec["round_id"])
        ended: list[str] = []
        for agent, oids in zip(rec["agents"], rec["orders"]):
            for oid in oids:
                view = self.orders.get(oid)
                if view is None or view._round != rid:
                    continue
                view.events.append({"event": "committed", "agent_id": agent, "at_s": rec["now_s"]})
                if view._chosen is not None and view.status == PENDING:
                    view.status, view.award, view.reason = AWARDED, view._chosen, None
                    ended.append(oid)
        return ended

    def _hold_released(self, rec: dict[str, Any]) -> list[str]:
        rid = int(rec["round_id"])
        agents = list(rec["agents"])
        if agents:
            for oid in self._open.get(rid, []):
                view = self.orders.get(oid)
                if view is not None and view._round == rid:
                    view.events.append({"event": "released", "agents": agents, "at_s": rec["now_s"]})
        return self._commits_refused(rid, rec) if rec.get("refused") else []  # a fault-free round: nothing to read

    def _commits_refused(self, rid: int, rec: dict[str, Any]) -> list[str]:
        """The awards of round `rid` a ``hold_released`` record says did not take (``refused``):
        unserved after all (retried, or ended if out of attempts).

        The event names who refused and whose committed line was cancelled, where the
        journal says (``refused_by``, ``cancelled``: Ray runtime, schema 3).
        """
        ended: list[str] = []
        at_s = rec["now_s"]
        who = {key: bidders_by_order(rec.get(key)) for key in ("refused_by", "cancelled")}
        for oid in rec["refused"]:
            view = self.orders.get(oid)
            if view is None or view._round != rid or view.status != PENDING:
                continue
            view._chosen = None
            event: dict[str, Any] = {"event": "commit_refused", "round_id": rid, "at_s": at_s}
            event.update({key: by_order[oid] for key, by_order in who.items() if oid in by_order})
            view.events.append(event)
            if self._unserved(view, COMMIT_REFUSED):
                ended.append(oid)
        return ended

    def _order_dropped(self, rec: dict[str, Any]) -> list[str]:
        """An accepted order the service gave up without a round (its rounds kept failing)."""
        oid = rec["order_id"]
        view = self.orders.get(oid)
        if view is None or view.ended:
            return []
        view.status, view.reason, view._round, view._chosen = UNFULFILLED, str(rec["reason"]), None, None
        view.events.append({"event": "unfulfilled", "reason": view.reason, "at_s": rec["now_s"],
                            "rounds_failed": int(rec["rounds_failed"])})
        return [oid]

    def _profile_changed(self, rec: dict[str, Any]) -> None:
        self.profile = str(rec.get("name") or "custom")

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Orders kept: pending, live and archived."""
        return len(self.orders) + len(self.archive)

    def knows(self, order_id: str) -> bool:
        """Whether the order is kept (pending, live or archived)."""
        return order_id in self.orders or order_id in self.archive

    def detail(self, order_id: str) -> dict[str, Any] | None:
        """The `GET /orders/{id}` body of a kept order, or None (unknown or forgotten)."""
        view = self.orders.get(order_id)
        if view is not None:
            return {**view.detail(), "events": [dict(e) for e in view.events]}
        archived = self.archive.get(order_id)
        return archived[2] if archived is not None else None

    def answer(self, order_id: str) -> dict[str, Any] | None:
        """The `POST /orders` body of a kept order, or None."""
        view = self.orders.get(order_id)
        if view is not None:
            return view.answer()
        archived = self.archive.get(order_id)
        return _answer_of(archived[2]) if archived is not None else None

    def by_key(self, key: str) -> tuple[str, dict[str, Any] | None] | None:
        """The body hash and the answer (None while pending) of the kept order placed with
        `key`; None when there is none (or its journal did not record the body hash)."""
        oid = self.keys.get(key)
        if oid is None:
            return None
        view = self.orders.get(oid)
        if view is not None:
            digest, answer = view.body_hash, view.answer() if view.ended else None
        else:
            archived = self.archive.get(oid)
            if archived is None:
                return None
            digest, answer = archived[1], _answer_of(archived[2])
        return (digest, answer) if digest is not None else None

    def unfinished(self) -> list[OrderView]:
        """Orders accepted and not ended (a restart takes them up again), in arrival order."""
        return [v for v in self.orders.values() if not v.ended]
