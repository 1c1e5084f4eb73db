"""Warehouses (central or front): the sources of a combination.

Capacity is a pick queue: an order can be taken while it would be picked within
`max_queue_s`. Stock is held per round for every order quoted, so a round can never
sell the same unit twice, and released when the round closes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, AgentEnv
from market.config import WarehouseCfg
from market.round import UNKNOWN_SKU, Round
from market.types import CATEGORY_CODES, AwardLine, Category, Kind, SourceQuote

COLD = np.zeros(len(CATEGORY_CODES), dtype=bool)
COLD[[CATEGORY_CODES[Category.CHILLED], CATEGORY_CODES[Category.FROZEN]]] = True


class Warehouse(Agent):
    """A warehouse quoting as a source: price and ready time per order."""

    kind = Kind.WAREHOUSE
    cfg: WarehouseCfg

    def __init__(self, cfg: WarehouseCfg, env: AgentEnv) -> None:
        super().__init__(cfg, env)
        self.x, self.y = cfg.x_km, cfg.y_km
        self.per_order_s = 60.0 / cfg.picks_per_min
        self.target_stock = self._initial_stock(cfg, env)
        self.stock = self.target_stock.copy()
        self.held_stock = np.zeros_like(self.stock)
        self.queue_free_s = 0.0
        self.busy_s = 0.0
        self.start_s: float | None = None
        self.next_replenish_s = cfg.replenish_every_h * 3600.0

    @staticmethod
    def _initial_stock(cfg: WarehouseCfg, env: AgentEnv) -> np.ndarray:
        cat = env.catalogue
        allowed = np.isin(cat.category, [CATEGORY_CODES[c] for c in cfg.categories])
        skus = np.flatnonzero(allowed)
        stocked = skus[: max(1, int(round(cfg.assortment * len(skus))))]
        stock = np.zeros(len(cat.sku_ids), dtype=np.int64)
        stock[stocked] = cfg.stock_per_sku
        return stock

    def capacity_total(self) -> int:
        return max(1, int(self.cfg.max_queue_s / self.per_order_s))

    def capacity_free(self) -> int:
        backlog_s = max(0.0, self.queue_free_s - self.now_s)
        return max(0, int((self.cfg.max_queue_s - backlog_s) / self.per_order_s))

    def utilization(self, now: float) -> float:
        elapsed = now - (self.start_s if self.start_s is not None else now)
        return min(1.0, self.busy_s / elapsed) if elapsed > 0 else 0.0

    def _advance(self, now: float) -> None:
        if self.start_s is None:
            self.start_s = now
        while now >= self.next_replenish_s:
            self.stock = np.maximum(self.stock, self.target_stock)
            self.next_replenish_s += self.cfg.replenish_every_h * 3600.0

    def _stock_ok(self, rnd: Round, eligible: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Orders whose lines all fit in free stock, counting earlier orders of the round.

        Returns the order mask and the (order, sku, qty) lines to hold. Works on the
        round's lines only; a SKU wanted by several orders takes the cumulative path,
        which serves them in round order and never oversells.
        """
        ok = eligible & ~rnd.has_unknown_sku
        rows = ok[rnd.item_order].nonzero()[0]
        sku, qty, order = rnd.item_sku[rows], rnd.item_qty[rows], rnd.item_order[rows]
        free = self.stock[sku] - self.held_stock[sku]
        if self._repeats(sku):
            row_ok = self._cumulative_fit(sku, qty, order, free)
        else:
            row_ok = qty <= free
        if np.count_nonzero(row_ok) < len(row_ok):
            ok[order[~row_ok]] = False
            keep = ok[order]
            sku, qty, order = sku[keep], qty[keep], order[keep]
        return ok, (order, sku, qty)

    @staticmethod
    def _repeats(sku: np.ndarray) -> bool:
        """Whether a SKU appears on more than one line."""
        if len(sku) < 2:
            return False
        sorted_sku = np.sort(sku)
        return bool(np.count_nonzero(sorted_sku[1:] == sorted_sku[:-1]))

    @staticmethod
    def _cumulative_fit(sku: np.ndarray, qty: np.ndarray, order: np.ndarray, free: np.ndarray) -> np.ndarray:
        """Per line: does the SKU's demand up to and including this order fit in stock?"""
        by_sku = np.lexsort((order, sku))
        sku_s, qty_s = sku[by_sku], qty[by_sku]
        cum = np.cumsum(qty_s)
        starts = np.concatenate(([0], np.nonzero(np.diff(sku_s))[0] + 1))
        group_base = np.repeat(cum[starts] - qty_s[starts], np.diff(np.concatenate((starts, [len(sku_s)]))))
        row_ok = np.empty(len(sku), dtype=bool)
        row_ok[by_sku] = (cum - group_base) <= free[by_sku]
        return row_ok

    def _price(self, rnd: Round, now: float, eligible: np.ndarray, markup: float) -> tuple[SourceQuote | None, Any]:
        ok, lines = self._stock_ok(rnd, eligible)
        idx = ok.nonzero()[0]
        if len(idx) == 0:
            return None, None
        np.add.at(self.held_stock, lines[1], lines[2])
        cfg = self.cfg
        cost = cfg.handling_cost + cfg.unit_cost * rnd.units[idx] + cfg.cold_surcharge * COLD[rnd.category[idx]]
        ready = max(self.queue_free_s, now) + cfg.pick_s
        quote = SourceQuote(
            agent_id=self.agent_id,
            order_idx=idx,
            price=cost * markup,
            ready_s=np.full(len(idx), ready),
            reliability=self.reliability,
            capacity=0,
        )
        return quote, lines

    def _on_release(self, payload: Any) -> None:
        if payload is not None:
            np.subtract.at(self.held_stock, payload[1], payload[2])

    def _commit_line(self, line: AwardLine, now: float, payload: Any) -> None:
        lines = payload
        mine = lines[0] == line.order_idx
        sku, qty = lines[1][mine], lines[2][mine]
        np.subtract.at(self.stock, sku, qty)
        self.queue_free_s = max(self.queue_free_s, now) + self.per_order_s
        self.busy_s += self.per_order_s
        # the picked units, so a cancel can put them back; tuples pickle 20x faster than
        # arrays, and a bidder saves each new job to its log (agents.durable)
        self.schedule_completion(line.done_s, (line.on_time, tuple(sku.tolist()), tuple(qty.tolist())))

    def _uncommit(self, payload: Any, now: float) -> None:
        _, sku, qty = payload
        np.add.at(self.stock, np.asarray(sku, dtype=np.intp), qty)
        self.queue_free_s = max(self.now_s, self.queue_free_s - self.per_order_s)  # now_s: the latest time seen
        self.busy_s -= self.per_order_s

    def _on_complete(self, done_s: float, payload: Any) -> None:
        self.record_outcome(payload[0])
