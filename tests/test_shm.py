"""Shared memory between two ends on one host: negotiated, exact, bounded, refused when wrong."""

import os
import secrets
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stalwart.transport import Frame, Kind, ProtocolError, dial, get_transport, server_handshake
from stalwart.transport import shm
from stalwart.transport.base import Borrow

TOKEN = secrets.token_bytes(32)
LIMIT = 64 << 20


def ours() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob("stalwart-shm-*")}


@pytest.fixture
def pair():
    """An authenticated client and server connection over loopback TCP."""
    made = []

    def make(server_shm=True, client_shm=True):
        listener = get_transport("tcp", shm=server_shm).listen("127.0.0.1")
        box = {}

        def accept():
            conn = listener.accept()
            server_handshake(conn, TOKEN)
            conn.max_payload = LIMIT
            box["server"] = conn

        t = threading.Thread(target=accept)
        t.start()
        client = dial(listener.address, TOKEN, max_payload=LIMIT) if client_shm else None
        if client is None:
            conn = get_transport("tcp", shm=False).connect(listener.address)
            from stalwart.transport import client_handshake
            client_handshake(conn, TOKEN)
            conn.max_payload = LIMIT
            client = conn
        t.join(10)
        made.extend([client, box["server"], listener])
        return client, box["server"]

    yield make
    for thing in made:
        thing.close()


def test_both_ends_on_one_host_move_large_payloads_through_shared_memory(pair):
    before = ours()
    client, server = pair()
    assert client.shm_out is not None and server.shm_in is not None
    grad = np.arange(1_000_000, dtype=np.float32)
    into = np.zeros_like(grad)
    client.send(Frame(Kind.PUSH, clock=3, meta={"x": 1}), memoryview(grad))
    frame = server.recv(lambda f: memoryview(into))          # a float32 sink, as the server's
    assert frame.kind == Kind.PUSH and frame.clock == 3 and frame.meta == {"x": 1}
    assert frame.payload_len == grad.nbytes
    np.testing.assert_array_equal(into, grad)
    assert client.shm_out.seq == 1 and client.shm_out.fallbacks == 0
    assert ours() == before                                   # the receiver unlinked the name once mapped
    small = np.ones(100, dtype=np.float32)                    # below MIN_BYTES: inline, as plain TCP
    server.send(Frame(Kind.PARAMS, clock=1), memoryview(small))
    back = client.recv()
    np.testing.assert_array_equal(np.frombuffer(back.payload, np.float32), small)
    assert server.shm_out.name is None
    # what each end reports as the path its payload bytes took
    assert client.bytes_moved() == {"shm": grad.nbytes, "tcp": small.nbytes}
    assert server.bytes_moved() == {"shm": grad.nbytes, "tcp": small.nbytes}


def test_a_slot_still_in_use_sends_inline_and_a_larger_payload_grows_the_segment(pair):
    client, server = pair()
    a, b = np.full(300_000, 1.0, np.float32), np.full(300_000, 2.0, np.float32)
    client.send(Frame(Kind.PUSH), memoryview(a))
    client.send(Frame(Kind.PUSH), memoryview(b))              # not yet consumed: goes inline
    assert client.shm_out.fallbacks == 1
    first, second = server.recv(), server.recv()
    np.testing.assert_array_equal(np.frombuffer(first.payload, np.float32), a)
    np.testing.assert_array_equal(np.frombuffer(second.payload, np.float32), b)
    name = client.shm_out.name
    big = np.full(3_000_000, 3.0, np.float32)
    client.send(Frame(Kind.PUSH), memoryview(big))
    assert client.shm_out.name != name                        # a new, larger segment
    np.testing.assert_array_equal(np.frombuffer(server.recv().payload, np.float32), big)


def test_a_borrowed_payload_is_read_in_place_and_its_slot_freed_by_the_next_recv(pair):
    client, server = pair()
    grad = np.arange(500_000, dtype=np.float32)
    fallback = np.zeros_like(grad)
    client.send(Frame(Kind.PUSH), memoryview(grad))
    frame = server.recv(lambda f: Borrow(memoryview(fallback).cast("B")))
    view = np.frombuffer(frame.payload, np.float32)
    np.testing.assert_array_equal(view, grad)
    assert not fallback.any()                                 # no copy was made
    assert not view.flags.writeable                           # the sender's memory, read-only here
    # Until the server reads its next frame the slot stays lent: the sender goes inline.
    client.send(Frame(Kind.PUSH), memoryview(grad + 1))
    assert client.shm_out.fallbacks == 1
    np.testing.assert_array_equal(view, grad)                 # the borrowed bytes were not overwritten
    inline = server.recv(lambda f: Borrow(memoryview(fallback).cast("B")))
    np.testing.assert_array_equal(fallback, grad + 1)         # on the socket: into the fallback
    assert np.shares_memory(np.frombuffer(inline.payload, np.float32), fallback)
    client.send(Frame(Kind.PUSH), memoryview(grad + 2))       # the slot is free again
    assert client.shm_out.fallbacks == 1
    again = server.recv(lambda f: Borrow(memoryview(fallback).cast("B")))
    np.testing.assert_array_equal(np.frombuffer(again.payload, np.float32), grad + 2)
    with pytest.raises(ProtocolError, match="does not match the expected"):
        client.send(Frame(Kind.PUSH), memoryview(grad[:-1]))
        server.recv(lambda f: Borrow(memoryview(fallback).cast("B")))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=shm.MIN_BYTES // 4, max_value=600_000), min_size=1, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_any_sequence_of_payload_sizes_arrives_exactly(sizes, borrow):
    listener = get_transport("tcp").listen("127.0.0.1")
    box = {}
    t = threading.Thread(target=lambda: box.update(conn=_accepted(listener)))
    t.start()
    client = dial(listener.address, TOKEN, max_payload=LIMIT)
    t.join(10)
    server = box["conn"]
    try:
        rng = np.random.default_rng(len(sizes))
        for n, lend in zip(sizes, borrow):
            data = rng.standard_normal(n).astype(np.float32)
            client.send(Frame(Kind.PUSH), memoryview(data))
            sink = (lambda f: Borrow(memoryview(bytearray(f.payload_len)))) if lend else None
            np.testing.assert_array_equal(np.frombuffer(server.recv(sink).payload, np.float32), data)
    finally:
        for c in (client, server, listener):
            c.close()


def _accepted(listener):
    conn = listener.accept()
    server_handshake(conn, TOKEN)
    conn.max_payload = LIMIT
    return conn


@pytest.mark.parametrize("server_shm, client_shm", [(False, True), (True, False)])
def test_either_end_can_keep_everything_on_the_socket(pair, server_shm, client_shm):
    client, server = pair(server_shm, client_shm)
    assert client.shm_out is None and server.shm_in is None
    data = np.ones(500_000, np.float32)
    client.send(Frame(Kind.PUSH), memoryview(data))
    np.testing.assert_array_equal(np.frombuffer(server.recv().payload, np.float32), data)


@pytest.mark.parametrize("entry, reason", [
    (["../../etc/passwd", 1, 100], "not one stalwart creates"),
    (["stalwart-shm-1-0123456789abcdef", 1, 100], "cannot be opened"),
    (["stalwart-shm-1-0123456789abcdef", 1, 10**12], "outside this connection's limit"),
    ("nonsense", "outside this connection's limit"),
    (["stalwart-shm-1-0123456789abcdef", 0, 100], "malformed shared-memory entry"),
])
def test_a_bad_shared_memory_entry_is_refused_by_name(pair, entry, reason):
    client, server = pair()
    client.send(Frame(Kind.PUSH, meta={"shm": entry}))
    with pytest.raises(ProtocolError, match=reason):
        server.recv()


def test_a_segment_that_is_not_ours_is_refused(pair, tmp_path):
    client, server = pair()
    name = f"stalwart-shm-{os.getpid()}-{'ab' * 8}"
    path = shm.SHM_DIR / name
    path.write_bytes(b"\0" * (shm.HEADER_BYTES + 4096))   # right name and size, no magic number
    try:
        client.send(Frame(Kind.PUSH, meta={"shm": [name, 1, 100]}))
        with pytest.raises(ProtocolError, match="magic"):
            server.recv()
    finally:
        path.unlink(missing_ok=True)


def test_shared_memory_on_a_connection_that_did_not_agree_to_it_is_refused(pair):
    client, server = pair(server_shm=False)
    client.send(Frame(Kind.PUSH, meta={"shm": ["stalwart-shm-1-0123456789abcdef", 1, 100]}))
    with pytest.raises(ProtocolError, match="did not agree"):
        server.recv()


def test_segments_of_dead_processes_are_removed():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    path = shm.SHM_DIR / f"stalwart-shm-{dead}-{'cd' * 8}"
    mine = shm.SHM_DIR / f"stalwart-shm-{os.getpid()}-{'ef' * 8}"
    path.write_bytes(b"x")
    mine.write_bytes(b"x")
    try:
        assert shm.remove_orphans() >= 1
        assert not path.exists() and mine.exists()
    finally:
        path.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2 to create a network namespace")
def test_another_network_namespace_is_another_host():
    name = f"stwshm{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        code = "from stalwart.transport.shm import host_identity; print(host_identity())"
        there = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert there and there != shm.host_identity()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
