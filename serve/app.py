"""The HTTP API: a FastAPI app under one Ray Serve deployment that owns the order desk.

Routes are defined on the app itself (FastAPI >= 0.137 with Serve: no `include_router`).
The replica builds an `OrderDesk` (and, with ``bidders: ray``, one bidder actor per
resource, owned by the replica so they stop with it). One replica per journal: the
journal's writer holds a file lock, and the desk is the single auctioneer of its fleet.

Request path, kept lean because it decides throughput on 2 cores: a pure-ASGI body
limit (413, chunked bodies too), a bearer-token check when a token is set, pydantic
validation (422 naming the field), then `OrderDesk.place`, which journals the order and
returns a future the round loop resolves once the award is on disk. A desk whose round
loop dies is restarted inside the replica (`serve.keeper`).

    serve run configs/serve.yaml        # or: bidhive serve

No `from __future__ import annotations` here: `serve.ingress` rebuilds the route methods'
signatures, and FastAPI must see real types there, not strings.
"""
import asyncio
import email.message
import hmac
import logging
import os
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from runtime.gc_pauses import bound_gc_pauses
from runtime.local_ray import keep_replica_grpc_on_loopback
from serve.config import TOKEN_ENV, ServeCfg, with_env_token
from serve.desk import DeskError, OrderDesk
from serve.idempotency import body_hash
from serve.keeper import DeskKeeper
from serve.models import KEY_PATTERN, OrderDetail, OrderIn, OrderOut, Problem, StrategyIn, StrategyNow, StrategyOut

logger = logging.getLogger("bidhive.serve")


class Limits:
    """Per-replica settings read by the ASGI middleware (set when the replica starts)."""

    max_body_bytes = 16_384
    token: str | None = None


class BodyLimit:
    """413 for a body over the limit, whether it declares a length or arrives chunked.

    Reads the (small) body up front, so an oversized one never reaches the app and a
    good one is handed over as one message.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = Limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that yields the buffered body once, then the client's later messages."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _too_large(send: Any, limit: int) -> None:
    body = ('{"detail":"request body larger than %d bytes"}' % limit).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


#: Routes open without the token: the health check (for load balancers and probes) and
#: the API's own description, which holds nothing but the public schema.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class BearerToken:
    """401 unless the bearer token matches (when one is set), before anything reads the body.

    As middleware it answers first whatever the request holds: a caller without the token
    learns nothing about the request model, not even whether its JSON parses.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        token = Limits.token
        if token is None or scope["type"] != "http" or _route_path(scope) in OPEN_PATHS or _bearer(scope, token):
            await self.app(scope, receive, send)
            return
        await _problem(401, "missing or wrong bearer token",
                       {"WWW-Authenticate": 'Bearer realm="bidhive"'})(scope, receive, send)


def _route_path(scope: dict[str, Any]) -> str:
    """The path below the app's route prefix (`serve run` may mount it under one)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _bearer(scope: dict[str, Any], token: str) -> bool:
    """Whether the Authorization header carries `token` (compared in constant time)."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token.encode())
    return False


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _json_content(content_type: str) -> bool:
    """Whether FastAPI parses a body of this type as JSON (its own test: application/json or
    application/*+json; no type at all is not JSON, as its strict default has it)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _refused(err: DeskError) -> JSONResponse:
    return _problem(err.status, err.detail, {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None)


def _location(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        return "body"  # its loc holds the character offset, not a field
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(loc) or "body"


def _reason(err: dict[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        where = err.get("loc", ("body", "?"))[-1]
        return f"not valid JSON at character {where} ({err.get('ctx', {}).get('error', 'decode error')})"
    return str(err.get("msg", "invalid"))


api = FastAPI(
    title="bidhive",
    version="0.1.0",
    description="Place fulfilment orders; each is auctioned among the fleet's resources within a round.",
)
api.add_middleware(BodyLimit)
api.add_middleware(BearerToken)  # added last: runs first


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if not _json_content(content_type) and any(e.get("loc", ("",))[0] == "body" for e in errors):
        return _problem(415, f"the body must be JSON sent with 'Content-Type: application/json' "
                             f"(got {content_type or 'no Content-Type'})")
    first = errors[0] if errors else {}
    detail = f"{_location(first)}: {_reason(first)}" if first else "invalid request"
    return JSONResponse({"detail": detail, "errors": [{"field": _location(e), "reason": _reason(e)}
                                                      for e in errors]}, status_code=422)


@api.exception_handler(HTTPException)
async def _unreadable(request: Request, exc: HTTPException) -> Any:
    """A body FastAPI cannot even decode is the client's mistake: 422 saying why, not its 400."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return await http_exception_handler(request, exc)
    reason = _why_unreadable(cause)
    return JSONResponse({"detail": f"body: {reason}", "errors": [{"field": "body", "reason": reason}]},
                        status_code=422)


def _why_unreadable(err: BaseException) -> str:
    if isinstance(err, UnicodeDecodeError):
        return f"not valid UTF-8 (byte 0x{err.object[err.start]:02x} at position {err.start})"
    if isinstance(err, RecursionError):
        return "not readable JSON: nested too deeply"
    if isinstance(err, ValueError) and "digits" in str(err):
        return "not readable JSON: a number with too many digits"
    return f"not readable JSON ({type(err).__name__})"


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (401, 409, 413, 415, 422, 503)}


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1, graceful_shutdown_timeout_s=10)
@serve.ingress(api)
class BidhiveIngress:
    """The bidhive HTTP service (one replica per journal)."""

    def __init__(self, cfg: ServeCfg) -> None:
        keep_replica_grpc_on_loopback()  # `serve run` workers lack bidhive serve's preload
        Limits.max_body_bytes = cfg.max_body_bytes
        # `build` took it from BIDHIVE_TOKEN where the config had none; the replica's own
        # variable still counts (`serve run` may give it to the replicas only)
        Limits.token = cfg.token or os.environ.get(TOKEN_ENV) or None
        self.cfg = cfg
        self.keeper = DeskKeeper(cfg)
        bound_gc_pauses()  # the replica is set up: later full collections walk only what is new
        logger.info("bidhive desk ready: %s bidders, journal %s", cfg.bidders, cfg.journal)

    @api.post("/orders", response_model=OrderOut, responses={**_ERRORS, 202: {"model": OrderOut}})
    async def place_order(
        self, order: OrderIn,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=128,
                                             pattern=KEY_PATTERN),
    ) -> Any:
        """Auctions an order; answers with its award once the round has committed it."""
        desk = self.desk  # the one that took the order answers for it, even if the keeper replaces it
        try:
            placed = desk.place(order, body_hash(order.model_dump(mode="json")), idempotency_key)
        except DeskError as err:
            return _refused(err)
        if placed.answer is not None:
            return JSONResponse(placed.answer, headers={"Idempotent-Replayed": "true"})
        assert placed.future is not None
        try:
            answer = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(placed.future)),
                                            self.cfg.answer_timeout_s)
        except asyncio.TimeoutError:
            if not await asyncio.to_thread(desk.sync, placed.order_id):
                return _problem(503, f"order {placed.order_id} not accepted: the auctioneer did not take it in; "
                                     "retry", {"Retry-After": "5"})
            return JSONResponse({"order_id": placed.order_id, "status": "pending", "reason": None, "award": None,
                                 "auction": None}, status_code=202,
                                headers={"Location": f"/orders/{placed.order_id}"})
        return JSONResponse(answer)  # built by the desk in OrderOut's shape; skips re-validating it

    @api.get("/orders/{order_id}", response_model=OrderDetail, responses=_ERRORS)
    async def get_order(self, order_id: str) -> Any:
        """The order, its award and its event timeline."""
        try:
            detail = self.desk.order(order_id)
        except DeskError as err:
            return _refused(err)
        if detail is None:
            return _problem(404, f"no order {order_id!r}: unknown, or older than the last "
                                 f"{self.desk.cfg.retain_orders} ended orders this service keeps (retain_orders)")
        return JSONResponse(detail)

    @api.put("/strategy", response_model=StrategyOut, responses=_ERRORS)
    async def put_strategy(self, body: StrategyIn) -> Any:
        """Switches the scoring profile for the next rounds (journaled)."""
        try:
            return await asyncio.to_thread(self.desk.set_profile, body.profile)
        except DeskError as err:
            return _refused(err)

    @api.get("/strategy", response_model=StrategyNow, responses=_ERRORS)
    async def get_strategy(self) -> Any:
        """The scoring profile in force, and the ones `PUT /strategy` may name."""
        return self.desk.strategy()

    @api.get("/healthz")
    async def healthz(self) -> Any:
        """200 when the auctioneer runs and bidders answer; 503 otherwise."""
        ok, facts = await asyncio.to_thread(self.desk.health)
        facts["desk_restarts"] = self.keeper.restarts
        facts["fleet_state"] = self.desk.fleet_origin.facts()
        return JSONResponse(facts, status_code=200 if ok else 503)

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> Any:
        """Prometheus text exposition."""
        text = await asyncio.to_thread(self.desk.metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @property
    def desk(self) -> OrderDesk:
        """The desk now running (the keeper replaces one whose round loop died)."""
        return self.keeper.desk

    def __del__(self) -> None:
        keeper = getattr(self, "keeper", None)
        if keeper is not None:
            keeper.close()


def build(cfg: ServeCfg) -> Application:
    """The typed app builder `serve run` calls with the `args` of configs/serve.yaml."""
    cfg = with_env_token(cfg)
    return BidhiveIngress.options(
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
    ).bind(cfg)
