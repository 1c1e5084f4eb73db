"""The bidder channels (`runtime.channel`) in one process: order, errors, deadlines, breaks, auth."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import channel
from runtime.channel import Channel, ChannelBroken, ChannelServer, RemoteCallError

NODE = "node-a"


def _explode() -> None:
    raise ValueError("cannot be rebuilt here")


class Undecodable:
    """Pickles fine; unpickling it raises, on whichever side receives it."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _explode, ()


class Target:
    """Stands in for a bidder host: records the calls it ran, in order."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, tuple[Any, ...]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def dispatch(self, method: str, args: tuple[Any, ...]) -> Any:
        self.ran.append((method, args))
        if method == "echo":
            return args[0]
        if method == "slow":
            self.gate.wait(10)
            return "slow done"
        if method == "boom":
            raise ValueError("bad round")
        if method == "garbage":
            return Undecodable()
        raise AttributeError(method)


@pytest.fixture
def served() -> Iterator[tuple[Target, ChannelServer, tuple[str, bytes]]]:
    target = Target()
    server = ChannelServer(target.dispatch)
    endpoint = server.open(NODE, NODE)
    assert endpoint is not None
    yield target, server, endpoint
    target.gate.set()
    server.close()


def test_calls_run_in_the_order_sent_and_answer_their_own_caller(served: Any) -> None:
    target, _, endpoint = served
    ch = Channel.connect(endpoint, "b1")
    refs = [ch.echo.remote(k) for k in range(200)]
    ready, late = channel.wait(refs, timeout=10)
    assert late == [] and ready == refs
    assert [channel.get(r) for r in refs] == list(range(200))
    assert [a[0] for _, a in target.ran] == list(range(200))


def test_a_raising_method_fails_its_call_only(served: Any) -> None:
    _, _, endpoint = served
    ch = Channel.connect(endpoint, "b1")
    bad, good = ch.boom.remote(), ch.echo.remote("next")
    channel.wait([bad, good], timeout=10)
    with pytest.raises(RemoteCallError, match="ValueError: bad round"):
        channel.get(bad)
    assert channel.get(good) == "next"


def test_a_message_that_cannot_be_decoded_fails_its_call_only(served: Any) -> None:
    """A garbage bidder's reply that raises when unpickled is that call's error, not the round
    loop's; so is a call the bidder cannot unpickle. The channel goes on serving."""
    _, _, endpoint = served
    ch = Channel.connect(endpoint, "b1")
    bad_reply, bad_call, good = ch.garbage.remote(), ch.echo.remote(Undecodable()), ch.echo.remote("next")
    assert channel.wait([bad_reply, bad_call, good], timeout=10)[1] == []
    with pytest.raises(RemoteCallError, match="undecodable reply .ValueError: cannot be rebuilt here"):
        channel.get(bad_reply)
    with pytest.raises(RemoteCallError, match="ValueError: cannot be rebuilt here"):
        channel.get(bad_call)
    assert channel.get(good) == "next" and not ch.broken


def test_a_slow_call_is_late_at_the_deadline_and_answers_after(served: Any) -> None:
    target, _, endpoint = served
    ch = Channel.connect(endpoint, "b1")
    target.gate.clear()
    slow, behind = ch.slow.remote(), ch.echo.remote(7)
    start = time.monotonic()
    ready, late = channel.wait([slow, behind], timeout=0.2)
    assert ready == [] and late == [slow, behind]
    assert 0.15 <= time.monotonic() - start < 2.0
    target.gate.set()
    assert channel.get(behind, timeout=10) == 7  # queued behind the slow call, in order
    assert channel.get(slow) == "slow done"


def test_sends_do_not_wait_for_a_busy_bidder(served: Any) -> None:
    """8 MB to a bidder stuck in a call leave at once: what its socket cannot take waits in the outbox."""
    target, _, endpoint = served
    ch = Channel.connect(endpoint, "b1")
    target.gate.clear()
    ch.slow.remote()
    start = time.monotonic()
    refs = [ch.echo.remote(b"x" * 65_536) for _ in range(128)]
    assert time.monotonic() - start < 5.0
    target.gate.set()
    assert channel.wait(refs, timeout=30)[1] == []


def test_a_hang_up_breaks_pending_and_later_calls(served: Any) -> None:
    target, server, endpoint = served
    ch = Channel.connect(endpoint, "b1")
    assert channel.get(ch.echo.remote(1), timeout=10) == 1
    target.gate.clear()
    pending = ch.slow.remote()
    server.close()  # what the bidder process's death does to its sockets
    ready, _ = channel.wait([pending], timeout=5)
    assert ready == [pending] and ch.broken
    with pytest.raises(ChannelBroken):
        channel.get(pending)
    with pytest.raises(ChannelBroken):
        channel.get(ch.echo.remote(2))


def test_a_wrong_key_is_refused_and_the_listener_keeps_serving(served: Any) -> None:
    _, _, (address, key) = served
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Channel.connect((address, bytes(32)), "intruder")
    ch = Channel.connect((address, key), "b1")
    assert channel.get(ch.echo.remote("still here"), timeout=10) == "still here"


def test_two_auctioneers_get_their_own_answers(served: Any) -> None:
    _, _, endpoint = served
    a, b = Channel.connect(endpoint, "a"), Channel.connect(endpoint, "b")
    ra = [a.echo.remote(("a", k)) for k in range(50)]
    rb = [b.echo.remote(("b", k)) for k in range(50)]
    channel.wait(ra + rb, timeout=10)
    assert [channel.get(r) for r in ra] == [("a", k) for k in range(50)]
    assert [channel.get(r) for r in rb] == [("b", k) for k in range(50)]


def test_another_node_gets_no_channel() -> None:
    server = ChannelServer(Target().dispatch)
    assert server.open("node-b", NODE) is None
    assert server.listener is None


@pytest.fixture
def deaf() -> Iterator[tuple[str, bytes]]:
    """A bidder process that stopped: it took the connection, then reads nothing."""
    address, key = f"\0bidhive-test-{os.getpid()}-{time.monotonic_ns()}", bytes(range(32))
    listener = Listener(address, "AF_UNIX", authkey=key)
    held: list[Any] = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    yield address, key
    listener.close()
    for conn in held:
        conn.close()


def test_a_stopped_bidder_never_blocks_the_sender(deaf: tuple[str, bytes]) -> None:
    ch = Channel.connect(deaf, "stopped")
    start = time.monotonic()
    refs = [ch.echo.remote(b"x" * 65_536) for _ in range(128)]  # 8 MB: far more than a socket buffer
    assert time.monotonic() - start < 2.0
    assert ch.outbox and not ch.broken  # what the socket did not take waits
    ready, late = channel.wait(refs, timeout=0.2)
    assert ready == [] and late == refs


def test_a_channel_whose_bidder_takes_nothing_gives_up_past_the_outbox_bound(
        deaf: tuple[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "MAX_OUTBOX_BYTES", 1 << 20)
    ch = Channel.connect(deaf, "stopped")
    refs = [ch.echo.remote(b"x" * 65_536) for _ in range(64)]
    assert ch.broken and not ch.outbox
    with pytest.raises(ChannelBroken):
        channel.get(refs[0])


@pytest.fixture(scope="module")
def shared_server() -> Iterator[tuple[str, bytes]]:
    server = ChannelServer(Target().dispatch)
    endpoint = server.open(NODE, NODE)
    assert endpoint is not None
    yield endpoint
    server.close()


@settings(max_examples=40, deadline=None)
@given(calls=st.lists(st.one_of(st.binary(max_size=70_000), st.none()), min_size=1, max_size=40),
       timeouts=st.lists(st.sampled_from([0.0, 0.001, None]), min_size=1, max_size=5))
def test_property_every_call_gets_its_own_answer(shared_server: tuple[str, bytes], calls: list[bytes | None],
                                                 timeouts: list[float | None]) -> None:
    """Whatever mix of sizes and failures, and however the waits slice the replies, each call
    resolves to its own result (None stands for a raising method)."""
    ch = Channel.connect(shared_server, "prop")
    refs = [ch.echo.remote(c) if c is not None else ch.boom.remote() for c in calls]
    for t in timeouts:  # partial waits take whatever has arrived so far
        ready, late = channel.wait(refs, timeout=t)
        assert ready == [r for r in refs if r.done] and late == [r for r in refs if not r.done]
    assert channel.wait(refs, timeout=30)[1] == []
    for c, ref in zip(calls, refs):
        if c is None:
            with pytest.raises(RemoteCallError):
                channel.get(ref)
        else:
            assert channel.get(ref) == c
    ch.close()
