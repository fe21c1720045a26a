"""Wire format: round trips, and every malformed header is refused with a reason."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart.transport.frame import (HEADER, HEADER_SIZE, MAGIC, MAX_META, WIRE_VERSION, Frame, Kind,
                                      ProtocolError, decode_header, decode_meta, encode_header)


def header(kind=Kind.PUSH, magic=MAGIC, version=WIRE_VERSION, meta_len=0, payload_len=0):
    return HEADER.pack(magic, version, int(kind), 0, 1, 2, 3, 4, meta_len, payload_len)


@given(kind=st.sampled_from(list(Kind)), shard=st.integers(0, 2**32 - 1), worker=st.integers(0, 2**32 - 1),
       seq=st.integers(0, 2**64 - 1), clock=st.integers(0, 2**64 - 1), payload=st.integers(0, 2**40),
       meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**64 - 1),
                                                 max_size=4)))
def test_round_trip(kind, shard, worker, seq, clock, payload, meta):
    raw = encode_header(Frame(kind, shard=shard, worker=worker, seq=seq, clock=clock, meta=meta), payload)
    frame, meta_len = decode_header(raw[:HEADER_SIZE], max_payload=2**40)
    assert (frame.kind, frame.shard, frame.worker, frame.seq, frame.clock, frame.payload_len) == \
        (kind, shard, worker, seq, clock, payload)
    assert (decode_meta(raw[HEADER_SIZE:]) if meta_len else None) == meta


@pytest.mark.parametrize("raw, reason", [
    (header(magic=b"HTTP"), "bad magic"),
    (header(version=9), "wire version 9"),
    (HEADER.pack(MAGIC, WIRE_VERSION, 99, 0, 0, 0, 0, 0, 0, 0), "unknown frame kind 99"),
    (header(meta_len=MAX_META + 1), "meta length"),
    (header(payload_len=1025), "exceeds this connection's limit of 1024"),
    (b"STLW", "truncated header"),
])
def test_malformed_headers_are_named(raw, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_header(raw, max_payload=1024)


@settings(max_examples=500)
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_random_headers_never_crash_the_decoder(raw):
    try:
        frame, _ = decode_header(raw, max_payload=1 << 20)
    except ProtocolError:
        return
    assert frame.payload_len <= 1 << 20


@given(st.binary(max_size=64))
def test_random_meta_is_refused_or_a_map(raw):
    try:
        assert isinstance(decode_meta(raw), dict)
    except ProtocolError:
        pass


def test_oversized_meta_is_refused_on_send():
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_header(Frame(Kind.REQUEST, meta={"x": b"a" * (MAX_META + 1)}), 0)


@pytest.mark.parametrize("frame", [Frame(Kind.REQUEST, meta={"x": 2**70}), Frame(Kind.PUSH, clock=-1)])
def test_unencodable_frames_are_refused_on_send(frame):
    with pytest.raises(ProtocolError):
        encode_header(frame, 0)
