"""Gymnasium environments over the bidhive simulator, registered under `bidhive/`.

`gymnasium.make("bidhive/FulfilmentAuction-v0", scenario="peak", n_orders=6000)`:
one bidder (a rider pool by default) learns to bid in the real auction; see
`envs.fulfilment.FulfilmentAuctionEnv` for the spaces, rewards and arguments.
"""
from __future__ import annotations

from gymnasium.envs.registration import register, registry

ENV_IDS: tuple[str, ...] = ("bidhive/FulfilmentAuction-v0",)

if "bidhive/FulfilmentAuction-v0" not in registry:
    register(id="bidhive/FulfilmentAuction-v0", entry_point="envs.fulfilment:FulfilmentAuctionEnv")
