"""Pushing a gradient while backward is still computing it.

Backward produces the gradient from the last layer to the first. Without overlap a
worker waits for all of it and only then pushes, so a round costs computation plus
communication. With overlap the flat gradient is cut into *buckets* and each bucket
goes out, from autograd's hook, the moment autograd has accumulated every parameter in
it; by the time ``step()`` is called only the first layers' bucket is left to send.

* **Buckets.** Cut at every shard boundary (a bucket is one shard's slice, so it is one
  PUSH part: :mod:`stalwart.server.assembly`) and, walking the parameters from the last
  to the first, at the parameter boundary where a bucket reaches its size: ``bucket_mb``,
  25 MB by default as in PyTorch DDP. A shard that is one bucket goes out as an
  ordinary PUSH (over shared memory, still borrowed in place). Smaller buckets for
  small models were tried and lost: a connection has one shared-memory slot, freed when
  the server reads its next frame, so a shard's second part, sent right after its
  first, found the slot taken and went inline over the socket, blocking backward until
  the server read it (the paper CNN under BSP: 1,099 steps in 30 s against 1,652 with
  overlap off). Cut at 25 MB, a model of a few shards still overlaps: the last
  layers' shards go out while backward computes the first.
* **Readiness.** A post-accumulate-grad hook per parameter counts down its buckets. A
  parameter that gets no gradient in a pass never fires; ``finish()`` (called by
  ``step()``) sends what is left. A ``.grad`` that
  the user's code replaced (``zero_grad(set_to_none=True)``) is copied back into the
  flat vector inside the hook, before its bucket leaves.
* **One backward per step.** A bucket, once sent, is the push: a second backward pass
  before ``step()`` (gradient accumulation) would change values already on the wire.
  A hook that runs before accumulation refuses it with an error that says to turn
  overlap off for such a loop; nothing torn reaches a server.
* **Semantics unchanged.** The parts carry the seq and clock of the ``push_pull`` that
  follows, and a server applies nothing until the parts cover its shard; every policy
  and recovery strategy sees one push per worker per clock, byte for byte the
  unbucketed one. A connection that breaks while parts go out is handed to that
  ``push_pull`` as broken, whose failover redoes the whole request.
* **Sent from the hook, not a thread.** A send is a copy into the socket's kernel buffer
  (or the shared-memory segment); the server receives and checks it while autograd
  computes the layers before. A sender thread was tried first: on two cores shared by
  seven processes its GIL handoffs (a queue's put and notify in the middle of backward)
  cost more than the sends (BSP on the demo's work: 21 rounds/s against 52 without
  overlap; from the hook, 51).
* **Not armed** before the first ``step()`` (which offers the initial weights and may
  skip its push), nor for shards being trained through locally.
"""

from __future__ import annotations

import numpy as np

from .client import ParameterClient
from .flat import FlatModel

DEFAULT_BUCKET_MB = 25.0


class Bucket:
    """The floats ``[lo, hi)`` of the flat gradient: part of shard ``shard`` (from ``at`` in it)."""

    def __init__(self, shard: int, lo: int, hi: int, at: int, params: list[int]):
        self.shard, self.lo, self.hi, self.at, self.params = shard, lo, hi, at, params
        self.whole = False  # the bucket is the shard's whole slice: an ordinary PUSH


def cut_buckets(sizes: list[int], bounds: list[int], bucket_floats: int) -> list[Bucket]:
    """Buckets over parameters of ``sizes`` (in flat order) and shards ``bounds``, in the
    order backward fills them (the last parameters first)."""
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    cuts = set(bounds)
    run = 0
    for i in range(len(sizes) - 1, -1, -1):
        run += sizes[i]
        if run >= bucket_floats:
            cuts.add(offsets[i])
            run = 0
    cuts = sorted(c for c in cuts if 0 <= c <= bounds[-1])
    buckets = []
    for lo, hi in zip(cuts, cuts[1:]):
        if hi <= lo:
            continue
        shard = int(np.searchsorted(bounds, lo, side="right")) - 1
        params = [i for i in range(len(sizes)) if offsets[i] < hi and lo < offsets[i + 1]]
        bucket = Bucket(shard, lo, hi, lo - bounds[shard], params)
        bucket.whole = (lo, hi) == (bounds[shard], bounds[shard + 1])
        buckets.append(bucket)
    return buckets[::-1]


class OverlappedPush:
    """Sends ``flat``'s gradient to ``client``'s shards bucket by bucket as backward
    produces it (see the module's notes); ``step()`` calls :meth:`finish` and hands what
    it returns to ``push_pull``. The client is not used by anything else meanwhile."""

    def __init__(self, flat: FlatModel, client: ParameterClient, bucket_mb: float = DEFAULT_BUCKET_MB):
        if flat.staged:
            raise ValueError("overlap needs the gradient in host memory as backward writes it (an unstaged model)")
        self.flat, self.client = flat, client
        slices = list(flat.slices())
        bucket_floats = max(1, int(bucket_mb * (1 << 20)) // 4)
        self.buckets = cut_buckets([hi - lo for _, lo, hi in slices], client.bounds, bucket_floats)
        self._of_param: list[list[int]] = [[] for _ in slices]
        for b, bucket in enumerate(self.buckets):
            for i in bucket.params:
                self._of_param[i].append(b)
        self._slices = slices
        self.armed = False
        self.clock = 0
        self._reset()
        self._handles = []
        for i, (p, _, _) in enumerate(slices):
            self._handles.append(p.register_hook(lambda grad, i=i: self._before_accumulate(i)))
            self._handles.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self._accumulated(i)))

    def _reset(self) -> None:
        self._waiting = [len(b.params) for b in self.buckets]
        self._sent = [False] * len(self.buckets)
        self._fired = [False] * len(self._slices)
        self.broke: set[int] = set()
        self._error: BaseException | None = None

    def arm(self, clock: int) -> None:
        """The next backward pass pushes for ``clock``."""
        self._reset()
        self.armed, self.clock = True, clock

    # --- autograd's side -------------------------------------------------------------
    def _before_accumulate(self, i: int) -> None:
        if self.armed and self._fired[i]:
            raise RuntimeError("a second backward pass before step() (gradient accumulation) would change a "
                               "gradient already pushed; with overlap on, each step() follows one backward "
                               "pass: turn overlap off (train.overlap = false, or overlap=False) for this loop")

    def _accumulated(self, i: int) -> None:
        if not self.armed:
            return
        self._fired[i] = True
        p, lo, hi = self._slices[i]
        self.flat.rehome_grad(p, lo, hi)
        for b in self._of_param[i]:
            self._waiting[b] -= 1
            if self._waiting[b] == 0:
                self._post(b)

    def _post(self, b: int) -> None:
        if not self._sent[b] and self.buckets[b].shard not in self.client.detached:
            self._sent[b] = True
            self._send(self.buckets[b])

    def _send(self, bucket: Bucket) -> None:
        if bucket.shard in self.broke or self._error is not None:
            return
        values = self.flat.grads_np[bucket.lo:bucket.hi]
        try:
            self.client.push_part(bucket.shard, values, None if bucket.whole else bucket.at, self.clock)
        except (ConnectionError, OSError):
            self.broke.add(bucket.shard)  # handed to push_pull, whose failover deals with it
        except BaseException as exc:  # noqa: BLE001 - raised by finish(), outside autograd's engine
            self._error = exc

    # --- step()'s side ---------------------------------------------------------------
    def finish(self) -> tuple[frozenset[int], frozenset[int]]:
        """Send the buckets backward did not finish, and disarm; returns (the shards pushed, those whose connection broke meanwhile)."""
        if not self.armed:
            return frozenset(), frozenset()
        for i, (p, lo, hi) in enumerate(self._slices):
            if not self._fired[i]:
                self.flat.rehome_grad(p, lo, hi)
        for b in range(len(self.buckets)):
            self._post(b)
        self.armed = False
        if self._error is not None:
            raise self._error
        shards = {bucket.shard for b, bucket in enumerate(self.buckets) if self._sent[b]}
        return frozenset(shards - self.broke), frozenset(self.broke)

    @property
    def started(self) -> bool:
        """Whether any part of the next push has gone out (the client must not be used meanwhile)."""
        return self.armed and any(self._sent)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
