"""The control channel against a real daemon on the simulated camera: framing, sizes, nesting,
state after stop, and a property-based storm of malformed and concurrent requests.

Every reply must be one JSON object with ``ok``, and ``error`` naming the problem when ``ok`` is
false; the channel and the run must outlive whatever a client sends.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._control import MAX_JSON_DEPTH, MAX_REQUEST_BYTES
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import ControlClient, Subscriber

# Small frames and one cheap stage: the camera keeps its 100 frames/s on a shared 2-core machine.
LIVE = ("stages=[frame_stats]", "simulation.frame_height_px=64", "simulation.frame_width_px=64",
        "simulation.n_particles=5")


@pytest.fixture
def live(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> Daemon:
    daemon = Daemon(make_config(*LIVE))
    daemons.append(daemon)
    daemon.start()
    return daemon


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _req(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _reply(sock: zmq.Socket[Any], timeout_s: float = 5.0) -> dict[str, Any] | None:
    if not sock.poll(int(timeout_s * 1000)):
        return None
    frames = sock.recv_multipart()
    assert len(frames) == 1, f"a reply is one frame, got {len(frames)}"
    reply = json.loads(frames[0])
    _assert_well_formed(reply)
    return reply  # type: ignore[no-any-return]


def _assert_well_formed(reply: Any) -> None:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        assert isinstance(reply.get("error"), str) and reply["error"], reply
    # A reply never echoes a large request back (the largest legitimate one, status, is ~1 kB).
    assert len(json.dumps(reply)) < 4096, f"reply of {len(json.dumps(reply))} characters"


def _status_ok(endpoint: str) -> dict[str, Any]:
    with ControlClient(endpoint, timeout_s=5) as ctl:
        return ctl.status()


def test_multipart_request_is_answered_and_the_channel_lives(live: Daemon, ctx: zmq.Context[Any]) -> None:
    endpoint = live.control_endpoint
    assert endpoint is not None
    req = _req(ctx, endpoint)
    req.send_multipart([b'{"command":"status"}', b"x"])
    reply = _reply(req)
    assert reply is not None and reply["ok"] is False and "one frame" in reply["error"] and "2 frames" in reply["error"]
    req.send(b'{"command":"status"}')  # the same REQ socket goes on
    reply = _reply(req)
    assert reply is not None and reply["ok"] is True and reply["status"]["state"] == "running"
    # A DEALER peer (no empty delimiter) is answered with its own envelope.
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send(b'{"command":"status"}')
    assert dealer.poll(5000)
    frames = dealer.recv_multipart()
    assert len(frames) == 1 and json.loads(frames[0])["ok"] is True
    dealer.send_multipart([b"", b"a", b"b", b"c"])
    assert dealer.poll(5000)
    frames = dealer.recv_multipart()
    assert frames[0] == b"" and "3 frames" in json.loads(frames[-1])["error"]
    assert _status_ok(endpoint)["state"] == "running"


def test_raw_tcp_peers_with_other_framing_do_not_close_the_port(live: Daemon) -> None:
    endpoint = live.control_endpoint
    assert endpoint is not None and endpoint.startswith("tcp://")
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    # ZMTP/1.0: each frame is a length byte (flags included), a flags byte (1: more), the body.
    zmtp10 = b"\x01\x00" + bytes([1 + 20, 0]) + b'{"command":"status"}'  # identity frame, then a message
    zmtp10_multi = b"\x01\x00" + bytes([1 + 20, 1]) + b'{"command":"status"}' + b"\x02\x00x"
    zmtp10_delim = b"\x01\x00" + b"\x01\x01" + bytes([1 + 20, 1]) + b'{"command":"status"}' + b"\x02\x00x"
    zmtp3_bad = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16 + b"\x00" * 32 + b"\x04\xff" + b"\x00" * 64
    for payload in (zmtp10, zmtp10_multi, zmtp10_delim, zmtp3_bad, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4, b"\x00"):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(payload)
            time.sleep(0.05)
        assert _status_ok(endpoint)["state"] == "running", payload[:20]
    # a raw peer that stays connected does not block the others either
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(zmtp10)
        assert _status_ok(endpoint)["state"] == "running"


def test_request_size_is_limited_and_named(live: Daemon, ctx: zmq.Context[Any]) -> None:
    endpoint = live.control_endpoint
    assert endpoint is not None
    req = _req(ctx, endpoint)
    big = json.dumps({"command": "set", "key": "frame_stats.background_percentile", "value": "x" * 200_000}).encode()
    req.send(big)
    reply = _reply(req)
    assert reply is not None and reply["ok"] is False
    assert f"{len(big)} bytes" in reply["error"] and f"limit is {MAX_REQUEST_BYTES} bytes" in reply["error"]
    # Far larger: libzmq drops the connection unread (no reply) and everyone else is still served.
    huge = _req(ctx, endpoint)
    huge.send(b"x" * (8 << 20))
    assert _reply(huge, timeout_s=1.0) is None
    assert _status_ok(endpoint)["state"] == "running"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5000, 30000])
def test_deeply_nested_json_is_refused_by_name(live: Daemon, depth: int) -> None:
    endpoint = live.control_endpoint
    assert endpoint is not None
    payload = b'{"command": "set", "key": "frame_stats.background_percentile", "value": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(payload) <= MAX_REQUEST_BYTES
    with ControlClient(endpoint) as ctl:
        reply = ctl.request_raw(payload)
        assert reply["ok"] is False and f"nests deeper than {MAX_JSON_DEPTH} levels" in reply["error"], reply
        assert "RecursionError" not in reply["error"]
        assert ctl.status()["state"] == "running"


def test_pause_resume_set_after_stop_are_refused_naming_the_state(live: Daemon) -> None:
    endpoint = live.control_endpoint
    assert endpoint is not None
    with ControlClient(endpoint) as ctl:
        assert ctl.request("stop")["ok"]
        for request in ({"command": "pause"}, {"command": "resume"},
                        {"command": "set", "key": "frame_stats.background_percentile", "value": 20}):
            reply = ctl.request_raw(json.dumps(request).encode())
            assert reply["ok"] is False and "stopp" in reply["error"], (request, reply)
        assert live.wait(20)
        for request in ({"command": "pause"}, {"command": "resume"},
                        {"command": "set", "key": "frame_stats.background_percentile", "value": 20}):
            reply = ctl.request_raw(json.dumps(request).encode())
            assert reply["ok"] is False and "the run is stopped" in reply["error"], (request, reply)
        assert ctl.status()["state"] == "stopped"
    stop = live.runner.run_stop
    assert stop is not None and stop.exit_status == "success"


# -- the storm ---------------------------------------------------------------------------------

SETTABLE = ["frame_stats.background_percentile", "frame_stats.sample_stride_px", "acquisition.exposure_ms"]
KEYS = [*SETTABLE, "optics.na", "bus.capacity_frames", "", ".", "a..b", "x" * 300, "stages", "localize.threshold_snr"]
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _nested(depth: int) -> bytes:
    return b'{"command":"status","x":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"


requests = st.one_of(
    st.binary(max_size=300).map(lambda b: [b]),  # arbitrary bytes
    json_values.map(lambda v: [json.dumps(v).encode()]),  # JSON, but not a request
    st.builds(lambda c, k, v: [json.dumps({"command": c, "key": k, "value": v}).encode()],
              st.sampled_from(["status", "pause", "resume", "set", "STATUS", "act", "", "stop "]),
              st.sampled_from(KEYS), json_values),  # wrongly typed or unknown
    st.builds(lambda k, v: [json.dumps({"command": "set", "key": k, "value": v}).encode()],
              st.sampled_from(SETTABLE), st.floats(min_value=-5, max_value=200) | st.integers(-5, 200) | st.booleans()),
    st.integers(MAX_JSON_DEPTH, 3000).map(lambda d: [_nested(d)]),  # deeply nested
    st.integers(MAX_REQUEST_BYTES + 1, MAX_REQUEST_BYTES + 50_000).map(lambda n: [b'{"command":"status","p":"' + b"x" * n + b'"}']),
    st.lists(st.binary(max_size=40), min_size=2, max_size=5),  # multipart
)


def _random_request(rng: random.Random) -> list[bytes]:
    """Malformed requests for the client threads (hypothesis draws only on the main thread)."""
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 200))]
    if kind == 1:
        return [b'{"command":"status"}', rng.randbytes(5)]
    if kind == 2:
        return [_nested(rng.randrange(MAX_JSON_DEPTH, 2000))]
    if kind == 3:
        return [json.dumps({"command": "set", "key": rng.choice(KEYS), "value": rng.choice([None, True, 1e308, -1, "x", [1], {}])}).encode()]
    if kind == 4:
        return [b"x" * rng.randrange(MAX_REQUEST_BYTES + 1, MAX_REQUEST_BYTES * 2)]
    return [b'{"command":"status"}']


def _hammer(endpoint: str, seed: int, n: int, failures: list[str], answered: list[int]) -> None:
    rng = random.Random(seed)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = _req(ctx, endpoint)
        for _ in range(n):
            request = rng.choice([_random_request(rng)])
            sock.send_multipart(request)
            try:
                reply = _reply(sock)
            except AssertionError as exc:
                failures.append(f"{request!r:.100}: {exc}")
                return
            if reply is None:
                failures.append(f"no reply to {request!r:.100}")
                return
            answered[0] += 1
    finally:
        ctx.destroy(linger=0)


def test_a_storm_of_bad_and_concurrent_requests_leaves_the_run_intact(live: Daemon, ctx: zmq.Context[Any]) -> None:
    endpoint, events = live.control_endpoint, live.events_endpoint
    assert endpoint is not None and events is not None
    failures: list[str] = []
    answered = [0]
    threads = [threading.Thread(target=_hammer, args=(endpoint, seed, 300, failures, answered)) for seed in range(4)]
    for t in threads:
        t.start()
    req = _req(ctx, endpoint)
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=requests)
    def one(request: list[bytes]) -> None:
        req.send_multipart(request)
        reply = _reply(req)
        assert reply is not None, f"no reply to {request!r:.200}"
        seen["ok" if reply["ok"] else "refused"] += 1
        if reply["ok"]:
            # only well-formed requests with valid values may succeed
            body = json.loads(request[0])
            assert len(request) == 1 and body["command"] in ("status", "pause", "resume", "set"), (request, reply)

    t0 = time.monotonic()
    one()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert not failures, failures[:3]
    assert answered[0] == 4 * 300
    assert seen["refused"] > 1000 and seen["ok"] > 0, seen

    with ControlClient(endpoint) as ctl:
        if ctl.status()["state"] == "paused":
            ctl.request("resume")
        status = ctl.status()
        assert status["state"] == "running"
        # In flight: frames taken from the camera and not yet processed or dropped, at most the
        # bus (64) plus the frame in the stage.
        assert 0 <= status["frames_in_flight"] <= 65, status
        with Subscriber(events, ["frame_stats"]) as sub:
            assert sub.wait_ready(10)
            first = sub.recv(5)
            assert first is not None, "no frame_stats after the storm"
            # 100 frames/s: in 2 s at least a few dozen arrive, even on a loaded machine
            got = 1 + sum(1 for _ in range(30) if sub.recv(2) is not None)
            assert got >= 30
        assert ctl.request("stop")["ok"]
    assert live.wait(30)
    stop = live.runner.run_stop
    assert stop is not None and stop.exit_status == "success"
    assert stop.frames_received == stop.frames_processed + stop.frames_dropped
    assert stop.frames_processed > 0
    print(f"storm: {seen['ok'] + seen['refused'] + answered[0]} requests in {elapsed:.1f} s; {seen}")
