"""The data-plane client when a server dies under a request: in one process, real
servers on loopback, no role processes."""

import numpy as np
import pytest

from stalwart.metrics import EventLog
from stalwart.optim import build_optimizer
from stalwart.recovery.base import RecoveryStrategy
from stalwart.server.server import ParameterServer
from stalwart.shard import ShardState
from stalwart.sync import parse_policy
from stalwart.transport import TcpTransport
from stalwart.worker.client import ParameterClient
from stalwart.worker.failover import Reconnect, ServerUnavailable

SIZE = 1000
TOKEN = b"f" * 32
BOUNDS = [0, SIZE, 2 * SIZE]


@pytest.fixture
def servers():
    made = []

    def start(shard: int) -> tuple[ParameterServer, ShardState]:
        log = EventLog(None, "server", shard)
        state = ShardState(shard, SIZE, build_optimizer("sgd", SIZE, lr=1.0, momentum=0.0),
                           parse_policy("asp")(1, SIZE), 1, log)
        server = ParameterServer(TcpTransport().listen("127.0.0.1"), TOKEN, log, state, RecoveryStrategy())
        server.start()
        made.append(server)
        return server, state
    yield start
    for server in made:
        server.close()


def test_a_request_that_fails_leaves_no_stale_reply_behind_on_the_other_shards(servers):
    (a, _), (b, b_state) = servers(0), servers(1)
    addresses = [a.address, b.address]
    ParameterClient(list(addresses), BOUNDS, TOKEN, worker=0).init(np.zeros(2 * SIZE, np.float32))
    # An observer (the driver's evaluator): a short reconnect budget, as the driver's.
    observer = ParameterClient(list(addresses), BOUNDS, TOKEN,
                               failover=Reconnect(lambda failed, wait_s: (list(addresses), list(addresses)), 0.2))
    seen = np.empty(2 * SIZE, np.float32)
    assert observer.pull(seen, wait=False) == [0, 0]

    a.close()  # shard 0's server dies: the pull gives up on it after shard 1 has answered
    with pytest.raises(ServerUnavailable):
        observer.pull(seen, wait=False)

    a2, _ = servers(0)  # a new server for shard 0, and three updates on shard 1
    addresses[0] = a2.address
    worker = ParameterClient(list(addresses), BOUNDS, TOKEN, worker=0)
    params = np.zeros(2 * SIZE, np.float32)
    worker.init(params)
    for clock in range(3):
        worker.push_pull(np.ones(2 * SIZE, np.float32), params, clock)
    assert b_state.version == 3

    # The next pull reads shard 1 as it is now, not the reply the failed pull left unread.
    versions = observer.pull(seen, wait=False)
    assert versions[1] == 3
    np.testing.assert_array_equal(seen[SIZE:], b_state.params)
    np.testing.assert_array_equal(seen, params)
