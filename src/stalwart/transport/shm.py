"""Shared memory for the payloads of a connection whose two ends share a host.

A TCP connection stays the control channel: every frame, in order, with its header and
meta. Only a large payload (``MIN_BYTES`` or more) takes the other road: the sender
copies it into a segment of shared memory that it owns and sends the frame with
``payload_len`` 0 and a meta entry ``shm = [segment, seq, length]``; the receiver maps
the segment (once), copies the bytes into the buffer its caller gives it, and marks
``seq`` consumed in the segment's header. Two copies, no socket buffers, no wake-ups
per 64 KB: that is what makes it faster than loopback TCP for large models.

A receiver that can use the bytes where they lie *borrows* them instead
(:class:`~stalwart.transport.base.Borrow`): it gets a read-only view of the segment and
marks the payload consumed only when it reads its next frame. A server applies a
gradient so, straight from the segment: one copy in all, the sender's. The slot rule
below keeps that safe: until it is marked consumed the sender does not write there.

*Same host* is not guessed from addresses: each end that allows shared memory states
its host identity (boot id, network and mount namespace, user) when it authenticates,
and shared memory is used only when both ends stated the same one. So two processes in
different network namespaces (netlab's emulated hosts) keep talking over their
network, as real hosts would.

One slot per direction: the sender writes a payload only once the receiver has consumed
the previous one (request-reply, as pushes and pulls are, always finds it free); if it
has not, that payload simply goes inline over TCP, so a sender never waits on shared
memory. A segment is created on the first large payload, replaced by a larger one when
a payload outgrows it, named ``stalwart-shm-<pid>-<random>`` in ``/dev/shm`` with mode
0600, and unlinked by the receiver as soon as it is mapped (the sender unlinks it on
close too, and removes segments left by processes that no longer exist), so a killed
process leaves nothing behind for long. The receiver opens only names of that form,
regular files of its own user, large enough for what the frame claims; anything else
is a :class:`~stalwart.transport.frame.ProtocolError` naming the problem.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import secrets
import stat
import threading
from pathlib import Path

import numpy as np

from .frame import ProtocolError

MIN_BYTES = 64 << 10      # below this a payload goes inline: the socket is as fast
HEADER_BYTES = 4096       # the segment's header page: magic, consumed seq
ALIGN = 1 << 20           # segments grow in whole MiB
MAGIC = 0x53544C5753484D31  # "STLWSHM1"
SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^stalwart-shm-(\d+)-[0-9a-f]{16}$")


@functools.cache
def host_identity() -> str | None:
    """Who shares memory with whom: boot, network and mount namespaces, and user.
    None where there is no /dev/shm to share. Fixed for a process's life (it enters its
    namespaces before it starts), so read once."""
    if not os.access(SHM_DIR, os.W_OK):
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        net = os.stat("/proc/self/ns/net").st_ino
        mnt = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None
    return f"{boot}/{net}/{mnt}/{os.geteuid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans() -> int:
    """Unlink segments whose creating process is gone; returns how many."""
    removed = 0
    for path in SHM_DIR.glob("stalwart-shm-*"):
        m = _NAME.match(path.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


class _Mapping:
    """A mapped segment: its header words and its data area."""

    def __init__(self, fd: int, size: int):
        self.mm = mmap.mmap(fd, size)
        self.words = np.frombuffer(self.mm, dtype=np.uint64, count=2)  # magic, consumed
        self.data = memoryview(self.mm)[HEADER_BYTES:]
        self._closing = threading.Lock()
        self._closed = False

    def close(self) -> None:
        # Once, whoever comes first: a server closing its sessions at shutdown and the
        # session's own thread ending both close the connection (a server exited with an
        # AttributeError from the second ``del``).
        with self._closing:
            if self._closed:
                return
            self._closed = True
        del self.words
        self.data.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it


class ShmSender:
    """The sending end's segment (created on demand, grown when a payload outgrows it)."""

    def __init__(self):
        self.name: str | None = None
        self.map: _Mapping | None = None
        self.seq = 0
        self.fallbacks = 0  # payloads sent inline because the slot was still in use

    def write(self, body: memoryview) -> list | None:
        """Place ``body`` in the segment; returns the frame's ``shm`` entry, or None
        if it must go inline (the receiver has not consumed the previous payload)."""
        n = body.nbytes
        if self.map is not None and int(self.map.words[1]) != self.seq:
            self.fallbacks += 1
            return None
        if self.map is None or self.map.data.nbytes < n:
            self._create(n)
        np.copyto(np.frombuffer(self.map.data, np.uint8, n), np.frombuffer(body, np.uint8))
        self.seq += 1
        return [self.name, self.seq, n]

    def _create(self, n: int) -> None:
        self.close()
        remove_orphans()
        size = HEADER_BYTES + -(-n // ALIGN) * ALIGN
        name = f"stalwart-shm-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: pages are committed as payloads touch them
            self.map = _Mapping(fd, size)
        finally:
            os.close(fd)
        self.map.words[0] = MAGIC
        self.map.words[1] = 0
        self.name, self.seq = name, 0

    def close(self) -> None:
        if self.name is not None:
            try:
                (SHM_DIR / self.name).unlink()
            except OSError:
                pass  # the receiver unlinked it already
        if self.map is not None:
            self.map.close()
        self.name, self.map = None, None


class ShmReceiver:
    """The receiving end: maps the peer's segment and copies payloads out of it."""

    def __init__(self):
        self.name: str | None = None
        self.map: _Mapping | None = None
        self.last_seq = 0
        self.borrowed = 0  # the seq of a payload lent out as a view, not yet consumed

    def read_into(self, entry, target: memoryview | None) -> memoryview:
        """Copy the payload that ``entry`` (the frame's ``shm`` meta) names into
        ``target`` (or a fresh buffer) and mark it consumed."""
        n = self._locate(entry)
        if target is None:
            target = memoryview(bytearray(n))
        np.copyto(np.frombuffer(target, np.uint8), np.frombuffer(self.map.data, np.uint8, n))
        self.map.words[1] = self.last_seq  # the sender may now reuse the slot
        return target

    def borrow(self, entry) -> memoryview:
        """A read-only view of the payload ``entry`` names, in the segment itself; it is
        marked consumed by :meth:`release` (the connection's next ``recv``)."""
        n = self._locate(entry)
        self.borrowed = self.last_seq
        return self.map.data[:n].toreadonly()

    def release(self) -> None:
        """The borrowed payload is consumed: the sender may write the slot again."""
        if self.borrowed and self.map is not None:
            self.map.words[1] = self.borrowed
        self.borrowed = 0

    def _locate(self, entry) -> int:
        """Check ``entry`` against the segment (mapping a new one) and take its seq;
        returns the payload's length."""
        name, seq, n = self._check(entry)
        if name != self.name:
            self._open(name, n)
        elif HEADER_BYTES + n > len(self.map.mm):
            raise ProtocolError(f"shared-memory payload of {n} bytes exceeds segment {name}")
        if seq != self.last_seq + 1:
            raise ProtocolError(f"shared-memory payload {seq} of segment {name} is out of order "
                                f"(expected {self.last_seq + 1})")
        self.last_seq = seq
        return n

    @staticmethod
    def _check(entry) -> tuple[str, int, int]:
        if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
                or any(type(v) is not int or v < 1 for v in entry[1:])):
            raise ProtocolError(f"malformed shared-memory entry {entry!r}: expected [name, seq, length]")
        if not _NAME.match(entry[0]):
            raise ProtocolError(f"shared-memory segment name {entry[0]!r} is not one stalwart creates")
        return entry[0], entry[1], entry[2]

    def _open(self, name: str, n: int) -> None:
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise ProtocolError(f"shared-memory segment {name} cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ProtocolError(f"shared-memory segment {name} is not a regular file of this user")
            if st.st_size < HEADER_BYTES + n:
                raise ProtocolError(f"shared-memory segment {name} holds {st.st_size} bytes, "
                                    f"too few for a payload of {n}")
            mapping = _Mapping(fd, st.st_size)
        finally:
            os.close(fd)
        if int(mapping.words[0]) != MAGIC:
            mapping.close()
            raise ProtocolError(f"shared-memory segment {name} lacks stalwart's magic number")
        try:
            (SHM_DIR / name).unlink()  # mapped on both ends: the name has served
        except OSError:
            pass
        self.close()
        self.name, self.map, self.last_seq = name, mapping, int(mapping.words[1])

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        self.name, self.map, self.borrowed = None, None, 0
