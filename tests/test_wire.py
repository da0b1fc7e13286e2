"""The wire format: what goes out is what comes back, and malformed input is named."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel

from scopestream.daemon._messages import Header, WireError, decode, encode
from scopestream.daemon._schemas import stale_files


class _Body(BaseModel):
    count: int


def _header(**kw: object) -> Header:
    return Header(run_id="r", topic="t", seq=3, frame_seq=7, t_acquired=1.5, t_published=2.5, **kw)


@pytest.mark.parametrize("dtype", ["<f8", ">f4", "<u2", "<i8", "|b1", "<c8"])
def test_arrays_round_trip_bit_exact(dtype: str) -> None:
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(5, 3)) * 100).astype(dtype)
    frames = encode(_header(), _Body(count=2), {"a": a, "empty": np.zeros(0)})
    msg = decode(frames)
    assert msg.topic == "t" and msg.header.seq == 3 and msg.body == {"count": 2}
    np.testing.assert_array_equal(msg.arrays["a"], a)
    assert msg.arrays["a"].dtype == a.dtype.newbyteorder("<")  # big-endian goes out little-endian
    assert msg.arrays["empty"].shape == (0,)
    assert [b.name for b in msg.header.buffers] == ["a", "empty"]


def test_non_contiguous_array_is_sent_in_c_order() -> None:
    a = np.arange(20.0).reshape(4, 5)[:, ::2]
    msg = decode(encode(_header(), _Body(count=0), {"a": a}))
    np.testing.assert_array_equal(msg.arrays["a"], a)


def test_malformed_messages_are_named() -> None:
    good = encode(_header(), _Body(count=1), {"a": np.arange(3.0)})
    with pytest.raises(WireError, match="at least 3"):
        decode(good[:2])
    with pytest.raises(WireError, match="differs from frame 0"):
        decode([b"other", *good[1:]])
    with pytest.raises(WireError, match="lists 1 buffers"):
        decode(good[:3])
    with pytest.raises(WireError, match="bytes"):
        decode([*good[:3], b"\x00" * 5])
    with pytest.raises(WireError, match="undecodable"):
        decode([b"t", b"{not json", b"{}"])


def test_object_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot go on the wire"):
        encode(_header(), _Body(count=1), {"a": np.array(["x"], dtype=object)})


def test_schema_files_are_current() -> None:
    stale = stale_files()
    assert not stale, f"stale JSON Schema files {stale}: did you forget to run python -m scopestream.daemon._schemas --write?"


def test_subscriber_counts_sequence_gaps_per_topic() -> None:
    """A raw PUB socket sends seq 0, 1, 4 on one topic and 0 on another: 2 lost on the first."""
    import time

    import zmq

    from scopestream.daemon.client import Subscriber

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://gaps")
    with Subscriber("inproc://gaps", ["a", "b"], context=ctx) as sub:
        time.sleep(0.05)  # inproc subscriptions apply on the next send; no daemon to say welcome here
        for topic, seq in (("a", 0), ("a", 1), ("a", 4), ("b", 0)):
            header = Header(run_id="r", topic=topic, seq=seq, t_published=0.0)
            pub.send_multipart(encode(header, _Body(count=seq), {}))
        got = [sub.recv(1.0) for _ in range(4)]
    pub.close(0)
    assert [(m.topic, m.header.seq) for m in got if m] == [("a", 0), ("a", 1), ("a", 4), ("b", 0)]
    assert sub.gaps == {"a": 2}
