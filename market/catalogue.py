"""The SKU catalogue: ids, popularity and handling category.

Popularity follows a Zipf law so a front warehouse stocking the top 30% of SKUs covers
most orders, which is what makes front warehouses worth having.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from market.config import CatalogueCfg
from market.types import CATEGORY_CODES, Category

CATALOGUE_SEED = 20_261_122  # the catalogue is part of the fleet, not of a run's seed


@dataclass(frozen=True)
class Catalogue:
    """SKU ids in popularity order (index 0 is the best seller)."""

    sku_ids: tuple[str, ...]
    popularity: np.ndarray  # probabilities, sums to 1, descending
    category: np.ndarray  # int8 category code per SKU

    @classmethod
    def build(cls, cfg: CatalogueCfg) -> Catalogue:
        """Builds the catalogue deterministically from its config."""
        rng = np.random.default_rng(CATALOGUE_SEED)
        ranks = np.arange(1, cfg.skus + 1, dtype=np.float64)
        weights = ranks ** (-cfg.zipf_a)
        codes = np.array([CATEGORY_CODES[c] for c in Category], dtype=np.int8)
        category = rng.choice(codes, size=cfg.skus, p=[0.7, 0.14, 0.08, 0.08])
        ids = tuple(f"sku-{i:05d}" for i in range(cfg.skus))
        return cls(ids, weights / weights.sum(), category)

    @property
    def index(self) -> dict[str, int]:
        """SKU id to catalogue index."""
        return {sku: i for i, sku in enumerate(self.sku_ids)}

    def skus_of(self, category: Category) -> np.ndarray:
        """Indices of the SKUs in a category, best sellers first."""
        return np.flatnonzero(self.category == CATEGORY_CODES[category])
