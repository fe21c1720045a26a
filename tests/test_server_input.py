"""A live server process fed garbage keeps serving, with its state intact."""

import socket

import numpy as np
import pytest

from stalwart.config import JobConfig
from stalwart.launch.cluster import Cluster
from stalwart.transport import AuthError, Frame, Kind, TcpTransport, dial
from stalwart.transport.frame import HEADER, MAGIC, WIRE_VERSION
from stalwart.worker.client import ParameterClient, ServerError

from helpers import events

pytestmark = pytest.mark.integration
SIZE = 1000


@pytest.fixture
def cluster(tmp_path):
    config = JobConfig.validate_dict({"cluster": {"workers": 1, "servers": 1}, "sync": {"policy": "asp"},
                                      "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0},
                                      "progress": False})
    c = Cluster.start(config, tmp_path, [0, SIZE])
    control, shards = c.connect("observer")
    yield c, shards[0], tmp_path
    c.stop(control)


def authed(address, token):
    conn = dial(address, token, max_payload=SIZE * 4)
    return conn


def test_garbage_is_refused_and_the_server_keeps_serving(cluster):
    c, address, run_dir = cluster
    client = ParameterClient([address], [0, SIZE], c.token, worker=0)
    params = np.ones(SIZE, dtype=np.float32)
    client.init(params)

    # 1. raw bytes that are not a frame at all
    raw = socket.create_connection(address.split(":")[0:1] + [int(address.split(":")[1])])
    raw.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
    raw.close()
    # 2. the wrong token
    with pytest.raises(AuthError):
        dial(address, b"x" * 32)
    # 3. authenticated, then a bad magic
    conn = authed(address, c.token)
    conn.sock.sendall(HEADER.pack(b"EVIL", WIRE_VERSION, 10, 0, 0, 0, 0, 0, 0, 0))
    assert "bad magic" in conn.recv().meta["reason"]
    conn.close()
    # 4. an oversized payload announced
    conn = authed(address, c.token)
    conn.sock.sendall(HEADER.pack(MAGIC, WIRE_VERSION, 10, 0, 0, 0, 0, 0, 0, 1 << 40))
    assert "exceeds this connection's limit" in conn.recv().meta["reason"]
    conn.close()
    # 5. a push of the wrong size, for a shard the server does not hold, from an unknown worker
    for frame, payload, reason in [
        (Frame(Kind.PUSH, shard=0, worker=0), b"\0" * 12, "does not match the expected"),
        (Frame(Kind.PUSH, shard=5, worker=0), b"\0" * SIZE * 4, "shard 5 sent to shard 0"),
        (Frame(Kind.PULL, shard=0, worker=99), None, "worker id 99 is outside this job"),
        (Frame(Kind.PULL, shard=0, worker=0, meta={"hint": 5}), None, "PULL hint must be a map"),
    ]:
        conn = authed(address, c.token)
        conn.send(frame, payload)
        assert reason in conn.recv().meta["reason"]
        conn.close()
    # 6. a NaN gradient is refused, and the connection stays usable
    bad = np.full(SIZE, np.nan, dtype=np.float32)
    with pytest.raises(ServerError, match="NaN or infinite"):
        client.push(bad, clock=0)
    # the state is intact: one good push with SGD lr 0.5 moves 1.0 -> 0.5
    client.push(np.ones(SIZE, dtype=np.float32), clock=1)
    client.pull(params, wait=False)
    np.testing.assert_array_equal(params, np.full(SIZE, 0.5, dtype=np.float32))
    assert client.versions == [1]
    client.leave()
    client.close()
    reasons = [e["reason"] for e in events(run_dir, "rejected")]
    assert len(reasons) >= 7 and any("wrong HMAC" in r for r in reasons)


def test_unauthenticated_peer_gets_nothing(cluster):
    c, address, _ = cluster
    conn = TcpTransport().connect(address)
    assert conn.recv().kind == Kind.CHALLENGE
    conn.send(Frame(Kind.PULL, shard=0, worker=0))  # skipping the handshake
    reply = conn.recv()
    assert reply.kind == Kind.ERROR
    conn.close()
