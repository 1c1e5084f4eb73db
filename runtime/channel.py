"""Direct pipes from the auctioneer to the bidder actors on its own node.

Ray places, restarts and supervises the bidder actors; this module carries the rounds.
A Ray actor call costs about 1 ms of CPU across the processes involved on the 2-core
machine: a trivial method broadcast to 25 bidder actors cost 24-35 ms of CPU over Ray
calls and 1-6 ms over channels; a 12-order round 66 ms and 19 ms
(`python -m bench.ray_bench --round-transport`). With one actor per resource and a
broadcast per round, that cost decided the HTTP service's capacity.

Each bidder actor opens, when asked over Ray, a listener on a Linux abstract Unix
socket (no file to clean up, no network port: nothing listens beyond the host) that
accepts clients after an HMAC challenge on a random key (`multiprocessing.connection`).
Calls on a channel run one at a time in the order sent, like Ray calls from one caller
to a sync actor: one thread per channel in the actor reads a call, runs it and answers.
The auctioneer's sends never wait for the socket (an outbox per channel), so neither a
slow call nor a stopped process can stall the round loop.

Only the auctioneer's node uses channels: bidders elsewhere in a cluster keep Ray calls
(`ChannelServer.open` declines another node). When a channel breaks (the actor died),
its calls fail with `ChannelBroken`, a `RayError` like Ray's own actor errors. The
handshake key (32 random bytes per actor) reaches the auctioneer over Ray.
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, wait as wait_readable
from typing import Any

import ray

logger = logging.getLogger("bidhive.channel")

RayError = ray.exceptions.RayError

#: How long a wait sleeps before it looks again at what it cannot watch: Ray refs beside
#: channel calls, or bytes a full socket has not taken yet.
_POLL_S = 0.002

#: Bytes a channel keeps for a bidder whose socket takes nothing (a stopped process)
#: before it gives the channel up.
MAX_OUTBOX_BYTES = 64 * 1024 * 1024

_LENGTH = struct.Struct("!i")  # `multiprocessing.connection`'s frame header, for frames under 2 GiB


class ChannelBroken(RayError):
    """The channel closed under a call: the actor process died, or the call could not be sent."""


class RemoteCallError(RayError):
    """The method raised in the actor (Ray's `RayTaskError` on a channel)."""


class CallRef:
    """A call sent on a channel: `get` its result once `wait` says it is ready."""

    __slots__ = ("channel", "done", "value", "error")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        self.done, self.value, self.error = True, value, error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


# -- the actor's side ---------------------------------------------------------------------
class ChannelServer:
    """Serves channels inside an actor: `dispatch(method, args)` per call, in arrival order per channel.

    Each auctioneer that opens a channel gets its own connection (several auctioneers can
    share the bidders); the host serialises the calls of all of them with Ray's.
    """

    def __init__(self, dispatch: Callable[[str, tuple[Any, ...]], Any]) -> None:
        self.dispatch = dispatch
        self.listener: Listener | None = None
        self.endpoint: tuple[str, bytes] | None = None
        self.conns: list[Connection] = []
        self.served = 0  # calls answered, over all channels

    def open(self, node_id: str, here: str) -> tuple[str, bytes] | None:
        """The address and key to connect with, for an auctioneer on `node_id` (None on another node)."""
        if node_id != here:
            return None
        if self.endpoint is None:
            address, authkey = f"\0bidhive-{secrets.token_hex(12)}", secrets.token_bytes(32)
            self.listener = Listener(address, "AF_UNIX", authkey=authkey)
            threading.Thread(target=self._accept, args=(self.listener,), name="bidhive-channel", daemon=True).start()
            self.endpoint = (address, authkey)
        return self.endpoint

    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, ConnectionError) as err:  # a failed handshake: next one
                logger.warning("channel handshake refused: %s", err)
                continue
            except OSError:  # the listener was closed
                return
            self.conns = [c for c in self.conns if not c.closed] + [conn]
            threading.Thread(target=self._serve, args=(conn,), name="bidhive-channel-serve", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        """Runs one auctioneer's calls in order. A slow call holds the rest in the socket and in
        the auctioneer's outbox, which never makes the auctioneer wait (`Channel.send_some`)."""
        while True:
            try:
                msg = conn.recv_bytes()
            except (OSError, EOFError, TypeError):  # hung up (TypeError: closed under us by `close`)
                break
            self.served += 1
            try:
                method, args = pickle.loads(msg)  # from an authenticated auctioneer, as trusted as Ray's calls
                out: tuple[bool, Any] = (True, self.dispatch(method, args))
            except Exception as err:  # noqa: BLE001 - the caller gets it, as Ray would hand it over
                out = (False, f"{type(err).__name__}: {err}")
            try:
                conn.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, TypeError):
                break
        _close_quietly(conn)

    def close(self) -> None:
        """Stops listening and hangs up on every auctioneer, as the process's death would."""
        for conn in self.conns:  # a blocked read in another thread keeps a merely closed socket open
            try:
                with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, TypeError):  # already gone
                pass
        for part in [self.listener, *self.conns]:
            _close_quietly(part)
        self.listener, self.endpoint, self.conns = None, None, []


def _close_quietly(part: Connection | Listener | None) -> None:
    if part is not None:
        try:
            part.close()
        except OSError:  # already closed by another thread
            pass


# -- the auctioneer's side -------------------------------------------------------------------
class Channel:
    """The auctioneer's end of one bidder's channel; `channel.method.remote(*args)` as on a Ray handle."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.pending: deque[CallRef] = deque()
        self.broken = False
        # Sends never block: a stopped bidder process must not stall the round loop. The
        # frames wait in `outbox` until its socket takes them (MSG_DONTWAIT on a dup of
        # the connection's socket; reads stay blocking, as `recv_bytes` needs).
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self.outbox = bytearray()

    @classmethod
    def connect(cls, endpoint: tuple[str, bytes], name: str) -> Channel:
        """Connects to `ChannelServer.open`'s endpoint (the HMAC handshake included)."""
        address, authkey = endpoint
        return cls(Client(address, "AF_UNIX", authkey=authkey), name)

    def call(self, method: str, *args: Any) -> CallRef:
        ref = CallRef(self)
        if self.broken:
            ref.resolve(error=ChannelBroken(f"channel to {self.name} is closed"))
            return ref
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        self.outbox += _LENGTH.pack(len(payload))
        self.outbox += payload
        self.pending.append(ref)
        self.send_some()
        return ref

    def send_some(self) -> None:
        """Hands the socket as much of the outbox as it takes now, without waiting."""
        try:
            while self.outbox:
                del self.outbox[:self._sock.send(self.outbox, socket.MSG_DONTWAIT)]
        except BlockingIOError:
            if len(self.outbox) > MAX_OUTBOX_BYTES:
                self._break(BufferError(f"{len(self.outbox)} bytes unsent"))
        except OSError as err:
            self._break(err)

    def __getattr__(self, method: str) -> _Method:
        if method.startswith("_"):
            raise AttributeError(method)
        return _Method(self, method)

    def read_ready(self) -> None:
        """Takes every reply that has arrived off the socket; each answers the oldest pending call."""
        try:
            while self.pending:
                data = self.conn.recv_bytes()
                ref = self.pending.popleft()
                try:
                    ok, value = pickle.loads(data)
                except Exception as err:  # noqa: BLE001 - a reply this side cannot decode fails its call only
                    ok, value = False, f"undecodable reply ({type(err).__name__}: {err})"
                ref.resolve(value) if ok else ref.resolve(error=RemoteCallError(f"{self.name}: {value}"))
                if not self.conn.poll(0):
                    return
        except (OSError, EOFError) as err:
            self._break(err)

    def _break(self, why: BaseException | None) -> None:
        if not self.broken and why is not None:
            logger.warning("channel to %s broke (%s); its calls fail and it goes back to Ray calls",
                           self.name, type(why).__name__)
        self.broken = True
        while self.pending:
            self.pending.popleft().resolve(error=ChannelBroken(f"channel to {self.name} closed"))
        self.outbox.clear()
        self._sock.close()
        _close_quietly(self.conn)

    def close(self) -> None:
        self._break(None)


class _Method:
    __slots__ = ("channel", "method")

    def __init__(self, channel: Channel, method: str) -> None:
        self.channel, self.method = channel, method

    def remote(self, *args: Any) -> CallRef:
        return self.channel.call(self.method, *args)


# -- waiting on channel calls and Ray refs alike ---------------------------------------------------
def _pump(refs: Iterable[CallRef], timeout: float | None) -> None:
    """Sends what waits and reads replies for the channels that owe one of `refs`, waiting up
    to `timeout` (a little at a time while some bytes are still unsent)."""
    chans = {id(r.channel): r.channel for r in refs if not r.done and not r.channel.broken}
    for ch in chans.values():
        if ch.outbox:
            ch.send_some()
    by_conn = {c.conn: c for c in chans.values() if not c.broken}
    if not by_conn:
        return
    if any(c.outbox for c in by_conn.values()):
        timeout = _POLL_S if timeout is None else min(timeout, _POLL_S)
    for conn in wait_readable(list(by_conn), timeout):
        by_conn[conn].read_ready()  # type: ignore[index]


def wait(refs: Sequence[Any], *, num_returns: int | None = None, timeout: float | None = None) -> tuple[list[Any], list[Any]]:
    """`ray.wait` for Ray refs, channel calls, or both: (ready, not ready), in the given order."""
    need = len(refs) if num_returns is None else num_returns
    calls = [r for r in refs if isinstance(r, CallRef)]
    rays = [r for r in refs if not isinstance(r, CallRef)]
    if not calls:
        return ray.wait(list(rays), num_returns=need, timeout=timeout) if rays else ([], [])
    end = None if timeout is None else time.monotonic() + timeout
    ray_ready: set[Any] = set()
    while True:
        if rays:
            ray_ready = set(ray.wait(rays, num_returns=len(rays), timeout=0)[0])
        if sum(r.done for r in calls) + len(ray_ready) >= need:
            break
        left = None if end is None else max(0.0, end - time.monotonic())
        step = left if not rays else min(_POLL_S, _POLL_S if left is None else left)
        _pump(calls, step)
        if left == 0.0:  # time is up: one last look at what arrived meanwhile
            if rays:
                ray_ready = set(ray.wait(rays, num_returns=len(rays), timeout=0)[0])
            break
    ready = [r for r in refs if (r.done if isinstance(r, CallRef) else r in ray_ready)]
    return ready, [r for r in refs if not (r.done if isinstance(r, CallRef) else r in ray_ready)]


def get(ref: Any, *, timeout: float | None = None) -> Any:
    """`ray.get` for one Ray ref or channel call (a broken or raising call raises a `RayError`)."""
    if not isinstance(ref, CallRef):
        return ray.get(ref, timeout=timeout)
    if not ref.done:
        wait([ref], timeout=timeout)
        if not ref.done:
            raise TimeoutError(f"no reply from {ref.channel.name} within {timeout} s")
    return ref.result()
