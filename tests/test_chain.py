"""Chain replication in one process: a real coordinator and real replicas on loopback,
no role processes. Replication order, dedupe by (worker, push sequence), resending to a
new successor after a replica dies, and a joiner's state transfer."""

import threading
import time

import numpy as np
import pytest

from stalwart.control import Coordinator, CoordinatorClient
from stalwart.metrics import EventLog
from stalwart.optim import build_optimizer
from stalwart.recovery.chain import ChainRecovery, Member
from stalwart.server.server import ParameterServer
from stalwart.shard import ShardState
from stalwart.sync import parse_policy
from stalwart.transport import Frame, Kind, TcpTransport, dial
from stalwart.worker.client import ParameterClient
from stalwart.worker.failover import Reconnect

SIZE = 256
TOKEN = b"c" * 32


def wait_until(condition, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s}s")
        time.sleep(0.01)  # polling a condition another thread makes true, bounded above


class Replica:
    """One server of the chain, as run_server runs it, in this process."""

    def __init__(self, coordinator_address: str, index: int, mode: str):
        self.index = index
        log = EventLog(None, f"server-{index}")
        self.shard = ShardState(0, SIZE, build_optimizer("sgd", SIZE, lr=1.0, momentum=0.0),
                                parse_policy("asp")(1, SIZE), 1, log)
        self.control = CoordinatorClient(coordinator_address, TOKEN, "server", index)
        self.chain = ChainRecovery(index, self.control, TOKEN, "tcp", mode, every_updates=5)
        self.server = ParameterServer(TcpTransport().listen("127.0.0.1"), TOKEN, log, self.shard, self.chain)
        self.server.start()
        self.control.register(address=self.server.address)
        self.control.start_heartbeats(0.05)
        self.chain.start()

    def kill(self) -> None:
        """Everything this replica holds goes at once; its port stops answering."""
        self.chain.close()
        self.server.close()
        self.control.close()


class Chain:
    def __init__(self, replicas: int, mode: str = "strong"):
        self.coordinator = Coordinator(TcpTransport().listen("127.0.0.1"), TOKEN, EventLog(None, "coordinator"),
                                       servers=1, workers=1, lease_s=1.0, replicas=replicas,
                                       pulls_at_tail=mode == "strong")
        # As in its own process: serving, and expiring the leases of members that went silent.
        self.coordinator_thread = threading.Thread(target=self.coordinator.run, args=(0.05,), daemon=True)
        self.coordinator_thread.start()
        self.replicas = {i: Replica(self.coordinator.address, i, mode) for i in range(replicas)}
        self.control = CoordinatorClient(self.coordinator.address, TOKEN, "observer", 0)

    def members(self) -> list[int]:
        return [Member(*m).index for m in self.control.call("chain", shard=0)["members"]]

    def client(self) -> ParameterClient:
        heads = self.control.shard_map(5.0)
        return ParameterClient(heads, [0, SIZE], TOKEN, worker=0, tails=self.control.tails,
                               failover=Reconnect(lambda failed, wait_s: self.control.relocate(failed, timeout_s=wait_s), 5.0))

    def close(self) -> None:
        for r in self.replicas.values():
            r.kill()
        self.control.call("shutdown", reason="test over")
        self.control.close()
        self.coordinator_thread.join(5.0)


@pytest.fixture
def chain():
    made = []

    def make(replicas, mode="strong"):
        made.append(Chain(replicas, mode))
        return made[-1]
    yield make
    for c in made:
        c.close()


def steps(client: ParameterClient, params: np.ndarray, first_clock: int, count: int) -> None:
    ones = np.ones(SIZE, np.float32)
    for clock in range(first_clock, first_clock + count):
        client.push_pull(ones, params, clock)


def test_every_replica_applies_the_heads_log_in_order_and_reads_its_writes(chain):
    c = chain(3)
    assert c.members() == [0, 1, 2]
    client = c.client()
    params = np.zeros(SIZE, np.float32)
    client.init(params)
    for clock in range(20):
        client.push_pull(np.full(SIZE, clock + 1, np.float32), params, clock)
        # pulled from the tail, after the push: the push is already there (read your writes)
        assert client.versions == [clock + 1]
        assert params[0] == -sum(range(1, clock + 2))
    shards = [r.shard for r in c.replicas.values()]
    assert [s.version for s in shards] == [20, 20, 20]
    assert [r.chain.last_lsn for r in c.replicas.values()] == [21, 21, 21]  # the init and 20 pushes
    for s in shards[1:]:
        np.testing.assert_array_equal(s.params, shards[0].params)
    client.close()


def test_a_resent_push_is_acknowledged_once_and_applied_once(chain):
    c = chain(2)
    head = c.replicas[0]
    conn = dial(head.server.address, TOKEN, max_payload=SIZE * 4)
    conn.send(Frame(Kind.INIT, worker=0), np.zeros(SIZE, np.float32))
    assert conn.recv().kind == Kind.ACK
    push = Frame(Kind.PUSH, worker=0, seq=7, clock=0)
    conn.send(push, np.ones(SIZE, np.float32))
    first = conn.recv()
    conn.send(push, np.ones(SIZE, np.float32))  # the same (worker, seq): a worker resending after a failover
    second = conn.recv()
    assert first.kind == second.kind == Kind.ACK and first.clock == second.clock == 1
    conn.send(Frame(Kind.PUSH, worker=0, seq=8, clock=1), np.ones(SIZE, np.float32))
    assert conn.recv().clock == 2  # a new sequence is a new push
    conn.close()
    tail = c.replicas[1]
    wait_until(lambda: tail.shard.version == 2, what="the tail holding both pushes")
    np.testing.assert_array_equal(tail.shard.params, np.full(SIZE, -2.0, np.float32))
    assert tail.chain.dedupe[0].seq == 8


def test_a_dead_middle_is_bypassed_and_unacknowledged_entries_are_resent(chain):
    c = chain(3)
    client = c.client()
    params = np.zeros(SIZE, np.float32)
    client.init(params)
    steps(client, params, 0, 10)
    c.replicas[1].kill()
    steps(client, params, 10, 10)  # waits through the repair: acked only once the new tail holds each
    wait_until(lambda: c.members() == [0, 2], what="the middle's removal")
    assert client.pushes_acked == 20 and client.versions == [20]
    head, tail = c.replicas[0].shard, c.replicas[2].shard
    assert head.version == tail.version == 20
    np.testing.assert_array_equal(tail.params, np.full(SIZE, -20.0, np.float32))
    client.close()


def test_a_restarted_replica_copies_the_tails_state_and_joins_at_the_tail(chain):
    c = chain(2, mode="relaxed")
    client = c.client()
    params = np.zeros(SIZE, np.float32)
    client.init(params)
    steps(client, params, 0, 12)
    c.replicas[1].kill()
    wait_until(lambda: c.members() == [0], what="the dead tail's removal")
    joiner = c.replicas[1] = Replica(c.coordinator.address, 1, "relaxed")  # back, empty, same index
    assert c.members() == [0, 1]  # appended once it installed the tail's state
    assert joiner.shard.version == 12 and joiner.chain.last_lsn == c.replicas[0].chain.last_lsn
    np.testing.assert_array_equal(joiner.shard.params, np.full(SIZE, -12.0, np.float32))
    assert joiner.chain.dedupe == c.replicas[0].chain.dedupe
    client.close()
