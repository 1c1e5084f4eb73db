"""The HTTP service's settings: one YAML (`configs/serve.yaml`) for `bidhive serve` and `serve run`.

The file is in Ray Serve's own config format; its application's `args` are a `ServeCfg`
and its `http_options` give host and port, so both commands start the same app.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from market.auctioneer import BatchPolicy
from market.config import CONFIG_DIR, ConfigError, Strict, _read_yaml, parse_model
from serve.models import KEY_PATTERN

DEFAULT_CONFIG = CONFIG_DIR / "serve.yaml"


#: Bytes in the megabyte of `ServeCfg.journal_rotate_mb`.
MB = 1 << 20


#: Where set, the snapshot dirs of the service's bidder fleets take this prefix
#: (`serve.desk.spawn_fleet`): `bidhive serve` names one per run, so that it can remove the
#: dir of a replica that Serve killed before the replica could (`serve.runner.stop_service`).
FLEET_DIR_PREFIX_ENV = "BIDHIVE_FLEET_DIR_PREFIX"
FLEET_DIR_PREFIX = "bidhive-serve-"  # every service's fleet dirs start so; a run's own prefix too
#: Where set (``pid:start time``), the process whose life the service's fleet dirs belong to
#: (`bidhive serve` itself): a replica that Serve restarts leaves its dir to this run, and only
#: once this process is dead may another start take it (`serve.fleet_state.rescue_dead_fleets`).
SERVICE_PROCESS_ENV = "BIDHIVE_SERVICE_PROCESS"
#: The bearer token, where the config gives none (`with_env_token`).
TOKEN_ENV = "BIDHIVE_TOKEN"


class BatchCfg(Strict):
    """How orders become rounds (see `market.auctioneer.BatchPolicy`)."""

    window_ms: float = Field(5.0, ge=0, le=10_000)
    max_batch: int = Field(64, ge=1, le=1024)
    max_rounds_per_call: int = Field(4, ge=1, le=64)
    in_flight: int = Field(2, ge=1, le=2)
    retry_after_ms: float = Field(20.0, ge=0, le=600_000)
    max_attempts: int = Field(1, ge=1, le=100)

    def policy(self) -> BatchPolicy:
        """The core's batching policy."""
        return BatchPolicy(window_s=self.window_ms / 1000.0, max_batch=self.max_batch,
                           max_rounds_per_call=self.max_rounds_per_call, in_flight=self.in_flight,
                           retry_after_s=self.retry_after_ms / 1000.0, max_attempts=self.max_attempts)


class ServeCfg(Strict):
    """Everything the service is built from.

    Attributes:
        bidders: ``ray`` (one actor per resource, the product's shape) or ``local``
            (the agents inside the service process: one process, for laptops and tests).
        journal: the auction journal; a restart continues it and rebuilds the
            idempotency store and the order views from it.
        fsync: ``always`` syncs every record; ``interval`` syncs at least every 0.2 s and
            always before a client hears of an award.
        journal_rotate_mb: a journal file past this size is closed and the next record
            starts ``journal.1``, ``journal.2``, ... (None: one file that grows forever).
            Closed files never change again, so they can be copied while the service
            runs; `bidhive replay` needs the whole set. At each rotation the order index
            is checkpointed beside the journal, so a restart reads only the files after
            it (`serve.index_checkpoint`; without rotation, a restart reads everything).
        max_open_orders: orders accepted and not yet ended; beyond it, 503 + Retry-After.
        answer_timeout_s: how long `POST /orders` waits for the auction before answering
            202 ``pending`` (the order carries on; `GET /orders/{id}` has the result).
        max_ongoing_requests: requests inside the replica at once (most of them waiting
            for their round); about throughput x round time is enough.
        max_queued_requests: requests the proxy holds beyond those; the next get 503 +
            Retry-After at once, so an overload sheds instead of queueing into seconds.
        retain_orders: the most ended orders `GET /orders/{id}` and their idempotency
            keys still answer; older ones are forgotten in memory (the journal keeps
            them: `bidhive replay J --order ID`), and a request repeating a forgotten
            key is a new order. About 0.5 KB of memory each once archived.
        token: bearer token required on every route but `/healthz` and the API docs
            (`/docs`, `/redoc`, `/openapi.json`); else `BIDHIVE_TOKEN` (`with_env_token`).
            Printable ASCII without spaces, as a header carries it.
    """

    fleet: str = "default"
    policy: str = "heuristic"
    profile: str = "balanced"
    seed: int = Field(0, ge=0)
    bidders: Literal["ray", "local"] = "ray"
    journal: str = "var/journal.bhj"
    fsync: Literal["always", "interval"] = "interval"
    journal_rotate_mb: float | None = Field(256.0, ge=0.01, le=1_000_000)
    batch: BatchCfg = BatchCfg()
    deadline_ms: float = Field(250.0, gt=0, le=60_000)
    hold_ttl_s: float = Field(5.0, gt=0, le=3600)
    max_open_orders: int = Field(512, ge=1, le=1_000_000)
    answer_timeout_s: float = Field(5.0, gt=0, le=600)
    max_body_bytes: int = Field(16_384, ge=256, le=10_000_000)
    max_ongoing_requests: int = Field(64, ge=1, le=100_000)
    max_queued_requests: int = Field(32, ge=1, le=100_000)
    reserve_base: float = Field(10.0, ge=0)
    reserve_share: float = Field(0.4, ge=0)
    retain_orders: int = Field(1_000_000, ge=10_000, le=100_000_000)
    token: str | None = Field(None, min_length=8, max_length=512, pattern=KEY_PATTERN)  # a header carries it

    @property
    def journal_rotate_bytes(self) -> int | None:
        """`journal_rotate_mb` in bytes, as the journal writer takes it."""
        return None if self.journal_rotate_mb is None else int(self.journal_rotate_mb * MB)


def with_env_token(cfg: ServeCfg) -> ServeCfg:
    """`cfg` with the token from `BIDHIVE_TOKEN` where it has none, checked as the config's is.

    Resolved where the app is built, not in the replica: the replica's process only sees
    the variable on the embedded cluster, and a joined cluster's would serve without it.

    Raises:
        ConfigError: A token the variable gives that the config would not take.
    """
    token = os.environ.get(TOKEN_ENV)
    if cfg.token is not None or not token:
        return cfg
    return parse_model(ServeCfg, {**cfg.model_dump(), "token": token}, TOKEN_ENV)


class Listen(Strict):
    """Where the HTTP proxy listens (Serve's `http_options`)."""

    host: str = Field("127.0.0.1", min_length=1, max_length=253, pattern=r"^\S+$")  # "" would mean every address
    port: int = Field(8000, ge=1, le=65535)


def load_serve_cfg(path: str | Path | None = None, **overrides: Any) -> tuple[ServeCfg, Listen]:
    """Reads the first application's `args` and the `http_options` of a Serve config file.

    Non-None `overrides` replace settings (`host` and `port` go to the listener).
    """
    file = Path(path) if path else DEFAULT_CONFIG
    raw = _read_yaml(file)
    apps = raw.get("applications") if isinstance(raw, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{file}: not a Serve config (no list of applications)")
    args = _mapping(_mapping(apps[0], f"{file}: applications[0]").get("args"), f"{file}: applications[0].args")
    http = _mapping(raw.get("http_options"), f"{file}: http_options")
    given = {k: v for k, v in overrides.items() if v is not None}
    flags = {k: given.pop(k) for k in ("host", "port") if k in given}
    parse_model(Listen, flags, "the command line")  # a bad flag is named as one, not as the file's
    parse_model(ServeCfg, given, "the command line")
    listen = parse_model(Listen, {"host": "127.0.0.1", "port": 8000, **{k: v for k, v in http.items()
                                                                         if k in ("host", "port")}, **flags},
                         f"{file}: http_options")
    return parse_model(ServeCfg, {**args, **given}, f"{file}: applications[0].args"), listen


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """A YAML mapping as a dict (nothing there: empty); anything else is the file's mistake."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(value).__name__}")
    return dict(value)
