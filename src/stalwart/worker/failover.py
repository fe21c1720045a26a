"""What a worker's client does when a shard's connection breaks: the recovery policy.

The client (:class:`~stalwart.worker.client.ParameterClient`) multiplexes requests over
one connection per shard end; when one breaks (its server died), it asks its
:class:`Failover` what to do, in the middle of the request:

* :class:`NoFailover`: nothing can be done; the request fails with
  :class:`ServerUnavailable` (recovery strategy ``none``).
* :class:`Reconnect`: find the shard's server again (report the broken addresses to the
  coordinator, read the shard map) with bounded exponential backoff inside a time
  budget, offer our own parameters there (a server restarted with no state keeps the
  first offer; one restored from a checkpoint or a chain ignores it), and redo the
  request at once, before waiting on any other shard: their replies may wait on a
  barrier that the other workers pass only once the restarted server, knowing no
  clocks, has seen this worker's request. Checkpoints and chains.
* :class:`Detach`: do not wait for the server at all. Once the request's other replies
  are in, every shard is detached (the worker goes local as a whole; see
  :mod:`stalwart.worker.trainthrough` for why) and later requests skip them until the
  owner reattaches them. Stateless servers.

Finding a server (:meth:`Failover.reach`) is shared: the reconnecting policy redoes
requests through it, and a client that starts while a server is down finds it the same
way, whatever its policy.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

BACKOFF_FIRST_S = 0.02
BACKOFF_MAX_S = 1.0
T = TypeVar("T")
# (failed addresses, how long to wait for a complete shard map) -> (heads, tails)
Resolve = Callable[[list[str], float], tuple[list[str], list[str]]]
# ``client`` below is the ParameterClient asking, and ``request`` its Request: passed in,
# never imported, since the client depends on this module and not the other way round.


class ServerUnavailable(ConnectionError):
    """A shard's server could not be reached again within the reconnect budget."""


def _reconnecting_off(s: int) -> ServerUnavailable:
    return ServerUnavailable(f"lost the connection to shard {s} and reconnecting is off (recovery strategy none)")


class Failover:
    """The base: how to find a shard's server again, if there is any way to."""

    #: how long one attempt to find the servers waits for the coordinator's shard map to
    #: be complete (a restarted server registering): blocking is fine for a worker that
    #: cannot go on anyway, never for one that trains through the outage
    map_wait_s = 1.0

    def __init__(self, resolve: Resolve | None = None, budget_s: float = 0.0,
                 on_event: Callable[..., None] | None = None):
        self.resolve, self.budget_s = resolve, budget_s
        self.on_event = on_event or (lambda *a, **k: None)

    def locate(self, failed: list[str]) -> tuple[list[str], list[str]]:
        """Report ``failed`` and read where every shard's ends are now (or ConnectionError)."""
        return self.resolve(failed, self.map_wait_s)

    @property
    def can_reach(self) -> bool:
        return self.resolve is not None and self.budget_s > 0

    def reach(self, client, s: int, failed: list[str], then: Callable[[], T]) -> tuple[int, T]:
        """Find shard ``s``'s server (report ``failed``, read the map, dial) and run ``then``
        on the new connection, retrying both with bounded exponential backoff within the
        budget; returns (attempts, what ``then`` returned)."""
        if not self.can_reach:
            raise _reconnecting_off(s)
        t0 = time.monotonic()
        delay, attempts = BACKOFF_FIRST_S, 0
        while True:
            attempts += 1
            try:
                heads, tails = self.locate(failed)
                client.connect(s, heads[s], tails[s])
                return attempts, then()
            except (ConnectionError, OSError):
                if client.has_connection(s):
                    failed = client.disconnect(s)
            if time.monotonic() - t0 + delay > self.budget_s:
                raise ServerUnavailable(f"shard {s} did not come back within {self.budget_s:g}s "
                                        f"({attempts} attempts)")
            time.sleep(delay)  # backoff between attempts to reach a restarting server
            delay = min(2 * delay, BACKOFF_MAX_S)

    def broken(self, client, s: int, request, hint: dict | None) -> tuple[bool, dict | None]:
        """Shard ``s`` broke during ``request``: (whether the request was redone and its
        reply received, the hint so far)."""
        raise _reconnecting_off(s)

    def settle(self, client, gone: set[int]) -> None:
        """The request is over; ``gone`` are the shards left broken in it."""


class NoFailover(Failover):
    """Recovery ``none``: a lost server fails the request."""


class Reconnect(Failover):
    """Find the server again and redo the request there, within the budget."""

    def broken(self, client, s, request, hint):
        failed = client.disconnect(s)
        last_acked, t0 = client.acked_versions[s], time.monotonic()
        attempts, (found, hint) = self.reach(client, s, failed, lambda: client.redo(s, request, hint))
        self.on_event("reconnected", shard=s, attempts=attempts, waited_s=round(time.monotonic() - t0, 4),
                      last_acked_version=last_acked, found_version=found, server_version=client.versions[s])
        return True, hint


class Detach(Failover):
    """Do not wait: detach every shard once the request's other replies are in."""

    map_wait_s = 0.0  # a reattach attempt that finds no server returns at once: training goes on

    def broken(self, client, s, request, hint):
        return False, hint

    def settle(self, client, gone):
        client.broken |= gone
        for s in range(client.shards):
            client.detach(s)
