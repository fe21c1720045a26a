"""LTP connections and listener: a TCP connection for everything reliable, UDP for pushes.

Each LTP connection is a TCP connection (authentication, pulls, acknowledgements,
control: everything that must arrive, in order) plus a UDP flow for the payload of
PUSH frames. A push becomes a *round*: its frame (kind, clock, worker, meta) goes on
the TCP stream as an announcement that says the round number and length, and its
bytes go as UDP packets. The server reads the announcement in order with every other
frame (so a pull sent after a push is never handled before it), then waits for the
round under the Early Close rule and returns the frame with the filled payload.

The UDP flow is bound to its authenticated TCP connection: after the HMAC handshake
succeeds, the server's AUTH_OK carries a random 64-bit session id (and its UDP port);
the server accepts a packet only if its session id is one it issued, from the host of
that session's TCP peer. The id never crosses the wire before authentication.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import threading
import time
from typing import Any

import numpy as np

from ..base import ConnectionClosed, Listener, PayloadSink, Transport, Connection, split_address
from ..frame import Frame, Kind, ProtocolError
from ..tcp import TcpConnection, TcpTransport
from . import hadamard
from .config import LtpConfig
from .packet import (ACK, CLOSED, DATA, HEADER_SIZE, MUST, RESEND, PacketBuffer, PacketError,
                     decode_ack, encode_ack, packet_count, parse_batch, payload_per_packet)
from .pacing import BottleneckMeter, Pacer
from .round import EarlyClose, Reassembly, fill
from .udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, Sender, make_socket, receive

RTO_FIRST_S, RTO_MAX_S = 0.01, 0.2
ACK_BITS_PER_PACKET = 400_000
EOF_CHECK_S = 0.1


def _options(options: Any) -> Any:
    return LtpConfig() if options is None else options


class _OverTcp(Connection):
    """What both ends of an LTP connection leave to their TCP connection."""

    tcp: TcpConnection

    @property
    def max_payload(self) -> int:
        return self.tcp.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self.tcp.max_payload = value

    def settimeout(self, seconds: float | None) -> None:
        self.tcp.settimeout(seconds)

    def fileno(self) -> int:
        return self.tcp.fileno()  # every reply comes on the TCP stream

    #: payload bytes of pushes handed to UDP (each once: resent packets are not counted again)
    ltp_bytes = 0

    def bytes_moved(self) -> dict[str, int]:
        return {**self.tcp.bytes_moved(), "ltp": self.ltp_bytes}


# --- the server side -------------------------------------------------------------------

class LtpListener(Listener):
    def __init__(self, host: str, port: int, options: Any):
        self.options = _options(options)
        self.tcp = TcpTransport(shm=False).listen(host, port)  # LTP measures the network
        self.address = self.tcp.address
        tcp_port = split_address(self.address)[1]
        try:
            self.udp = make_socket(host, tcp_port, gro=True)
        except OSError:  # the same number is taken for UDP: any port will do, AUTH_OK says which
            self.udp = make_socket(host, 0, gro=True)
        self.udp_port = self.udp.getsockname()[1]
        self.job = secrets.randbits(32)
        self.per_packet = payload_per_packet(self.options.mtu)
        self.sessions: dict[int, LtpServerConnection] = {}
        self.malformed = 0
        self.meter = BottleneckMeter()
        self._closed = False
        self._thread = threading.Thread(target=self._receive_loop, name="ltp-recv", daemon=True)
        self._thread.start()

    def accept(self) -> "LtpServerConnection":
        return LtpServerConnection(self.tcp.accept(), self)

    def close(self) -> None:
        self._closed = True
        self.tcp.close()
        try:
            self.udp.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.udp.close()

    def send_ack(self, data: bytes, addr) -> None:
        try:
            self.udp.sendto(data, addr)
        except OSError:
            pass  # an ACK is advisory; the sender retransmits or the round closes anyway

    def _receive_loop(self) -> None:
        buf = bytearray(1 << 16)
        while not self._closed:
            try:
                nbytes, segment, addr = receive(self.udp, buf)
            except OSError:
                if self._closed:
                    return
                continue
            now = time.monotonic()
            try:
                rows, head, ok = parse_batch(buf, nbytes, segment)
            except (PacketError, ValueError):
                self.malformed += 1
                continue
            ok &= (head["type"] == DATA) & (head["job"] == self.job)
            self.malformed += int((~ok).sum())
            for session in np.unique(head["session"][ok]):
                conn = self.sessions.get(int(session))
                mine = ok & (head["session"] == session)
                if conn is None:
                    self.malformed += int(mine.sum())
                    continue
                self.meter.add(int(session), nbytes, now)
                try:
                    conn.on_packets(head[mine], rows[mine], addr, now)
                except (ValueError, IndexError):  # no input may stop the receive thread
                    self.malformed += int(mine.sum())


class LtpServerConnection(_OverTcp):
    def __init__(self, tcp: TcpConnection, listener: LtpListener):
        self.tcp, self.listener = tcp, listener
        self.peer = tcp.peer
        self.options = listener.options
        self.per_packet = listener.per_packet
        self.session = secrets.randbits(63) + 1
        self.udp_peer: tuple | None = None
        self._cond = threading.Condition()
        self._rounds: dict[int, Reassembly] = {}
        self._stores = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        self._previous: np.ndarray | None = None
        self.closed_round = 0
        self.early = EarlyClose(self.options.min_fraction, self.options.slack)
        self._drop = np.random.default_rng(self.options.drop_seed) if self.options.drop > 0 else None
        self.stats = {"rounds": 0, "lost_packets": 0, "packets": 0, "resends": 0, "refused": 0, "dropped": 0}
        self._closed = False

    def send(self, frame: Frame, payload: memoryview | bytes | None = None) -> None:
        if frame.kind == Kind.AUTH_OK:
            # The handshake succeeded: only now does the peer learn its UDP session.
            self.listener.sessions[self.session] = self
            frame.meta = {**(frame.meta or {}), "ltp": {
                "session": self.session, "port": self.listener.udp_port, "job": self.listener.job,
                "mtu": self.options.mtu, "rate_mbit": self.options.rate_mbit or 0,
                "hadamard": self.options.hadamard_block if self.options.hadamard else 0}}
        self.tcp.send(frame, payload)

    def recv(self, sink: PayloadSink | None = None) -> Frame:
        frame = self.tcp.recv(sink)
        if frame.kind == Kind.PUSH and frame.meta and "ltp" in frame.meta:
            return self._receive_round(frame)
        return frame

    def close(self) -> None:
        self._closed = True
        self.listener.sessions.pop(self.session, None)
        self.listener.meter.forget(self.session)
        with self._cond:
            self._cond.notify_all()
        self.tcp.close()

    # --- rounds --------------------------------------------------------------------
    def _frame_limit(self) -> int:
        n = self.max_payload // 4
        return 4 * hadamard.rotated_len(max(n, 1), self.options.hadamard_block) if self.options.hadamard \
            else self.max_payload

    def _announced(self, frame: Frame) -> tuple[int, int, int]:
        value = frame.meta.pop("ltp")
        if not (isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value)):
            raise ProtocolError(f"PUSH announcement 'ltp' must be [round, frame_len, payload_len], got {value!r}")
        round_, frame_len, payload_len = value
        if round_ <= self.closed_round:
            raise ProtocolError(f"LTP round {round_} announced after round {self.closed_round} closed")
        if not 0 < payload_len <= self.max_payload:
            raise ProtocolError(f"LTP round of {payload_len} bytes exceeds this connection's limit of "
                                f"{self.max_payload} bytes")
        if not payload_len <= frame_len <= self._frame_limit() or frame_len % 4:
            raise ProtocolError(f"LTP round length {frame_len} does not fit a payload of {payload_len} bytes")
        return round_, frame_len, payload_len

    def _reassembly(self, round_: int, frame_len: int) -> Reassembly:
        """Holds _cond."""
        r = self._rounds.get(round_)
        if r is None:
            need = packet_count(frame_len, self.per_packet) * self.per_packet
            store = self._stores[round_ % 2]
            if store.size < need:
                store = self._stores[round_ % 2] = np.zeros(need, dtype=np.uint8)
            r = self._rounds[round_] = Reassembly(round_, frame_len, self.per_packet, store)
        return r

    def _receive_round(self, frame: Frame) -> Frame:
        round_, frame_len, payload_len = self._announced(frame)
        started = time.monotonic()
        next_eof_check = started + EOF_CHECK_S
        with self._cond:
            r = self._reassembly(round_, frame_len)
            if r.frame_len != frame_len:
                raise ProtocolError(f"LTP round {round_}: packets say {r.frame_len} bytes, the announcement {frame_len}")
            while True:
                now = time.monotonic()
                action, wait = self.early.decide(r, now)
                if action.startswith("close"):
                    break
                if action == "resend":
                    r.resends += 1
                    r.resend_at = now + max(0.005, 2 * (self.early.span_s or 0.01))
                    self._ack(r, RESEND, bits=r.got, rate=self.listener.meter.share(now), lost=1.0 - r.fraction)
                    continue
                if now - started > self.options.round_timeout_s:
                    raise ConnectionClosed(f"{self.peer}: LTP round {round_} got {r.count} of {r.total} packets "
                                           f"in {self.options.round_timeout_s:g}s")
                if now >= next_eof_check:
                    next_eof_check = now + EOF_CHECK_S
                    if self._peer_gone():
                        raise ConnectionClosed(f"{self.peer} closed the connection during LTP round {round_}")
                self._cond.wait(min(wait, EOF_CHECK_S))
            del self._rounds[round_]
            for old in [k for k in self._rounds if k < round_]:
                del self._rounds[old]
            self.closed_round = round_
        lost = 1.0 - r.fraction
        self.early.learn(r)
        self._ack(r, CLOSED, rate=self.listener.meter.share(time.monotonic()), lost=lost)
        fill(self.options.fill, r, self._previous)
        values = r.rows.reshape(-1)[:frame_len]
        if self.options.fill == "previous":
            if self._previous is None or self._previous.size < values.size:
                self._previous = np.empty(values.size, dtype=np.uint8)
            self._previous[:values.size] = values
        if self.options.hadamard:
            floats = hadamard.unrotate(values.view(np.float32), payload_len // 4, self.options.hadamard_block,
                                       (self.session, round_))
            values = floats.view(np.uint8)
        st = self.stats
        st["rounds"] += 1
        st["packets"] += r.total
        st["lost_packets"] += r.total - r.count
        st["resends"] += r.resends
        frame.payload = memoryview(values[:payload_len])
        frame.payload_len = payload_len
        frame.meta["ltp"] = {"round": round_, "lost": round(lost, 6), "close": action.split(":")[1],
                             "ms": round(1000 * (time.monotonic() - started), 3), "packets": r.total,
                             "resends": r.resends, "mbit": round(r.delivery_rate() * 8e-6, 2),
                             "span_ms": round(1000 * ((r.last_t or 0) - (r.first_t or 0)), 3)}
        return frame

    def _peer_gone(self) -> bool:
        try:
            return self.tcp.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _ack(self, r: Reassembly, flags: int, bits: np.ndarray | None = None, base: int = 0,
             rate: float = 0.0, lost: float = 0.0) -> None:
        if self.udp_peer is None:
            return
        if bits is None:
            self.listener.send_ack(encode_ack(job=self.listener.job, session=self.session, round_=r.round, shard=0,
                                              flags=flags, base=base, rate=rate, received=r.count, lost=lost),
                                   self.udp_peer)
            return
        for start in range(0, bits.size, ACK_BITS_PER_PACKET):
            self.listener.send_ack(encode_ack(job=self.listener.job, session=self.session, round_=r.round,
                                              shard=0, flags=flags, base=start,
                                              bits=bits[start:start + ACK_BITS_PER_PACKET], rate=rate,
                                              received=r.count, lost=lost), self.udp_peer)

    def on_packets(self, head: np.ndarray, rows: np.ndarray, addr, now: float) -> None:
        """Packets of this session from the receive thread (headers checked for consistency)."""
        with self._cond:
            if self._closed:
                return
            if self.udp_peer is None:
                if addr[0] != self.peer.rpartition(":")[0].strip("[]"):
                    self.stats["refused"] += head.size
                    return
                self.udp_peer = addr
            elif addr != self.udp_peer:
                self.stats["refused"] += head.size
                return
            if self._drop is not None:  # loss on purpose (tests, experiments), seeded
                keep = self._drop.random(head.size) >= self.options.drop
                self.stats["dropped"] += int(head.size - keep.sum())
                head, rows = head[keep], rows[keep]
            for round_ in np.unique(head["round"]):
                round_ = int(round_)
                mine = head["round"] == round_
                h, rw = head[mine], rows[mine]
                if round_ <= self.closed_round or round_ > self.closed_round + 2:
                    continue  # a late packet of a closed round, or far ahead of anything announced
                frame_len = int(h["frame_len"][0])
                r = self._rounds.get(round_)
                expected_len = frame_len if r is None else r.frame_len
                good = ((h["frame_len"] == expected_len) & (h["offset"] == h["seq"] * self.per_packet)
                        & (h["total"] == packet_count(expected_len, self.per_packet)))
                if expected_len > self._frame_limit() or expected_len % 4:
                    good[:] = False
                self.stats["refused"] += int((~good).sum())
                if not good.any():
                    continue
                r = self._reassembly(round_, expected_len)
                h, rw = h[good], rw[good]
                r.place(h, rw, now)
                must = h["flags"] & MUST != 0
                for seq in h["seq"][must]:
                    self._ack(r, 0, bits=np.ones(1, dtype=bool), base=int(seq))
            self._cond.notify_all()


# --- the client side --------------------------------------------------------------------

class LtpClientConnection(_OverTcp):
    def __init__(self, tcp: TcpConnection, host: str):
        self.tcp, self.host = tcp, host
        self.peer = tcp.peer
        self.ready = False
        self.round = 0
        self.pacer = Pacer()
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def _open(self, info: dict) -> None:
        try:
            self.session, port, self.job = int(info["session"]), int(info["port"]), int(info["job"])
            self.per_packet = payload_per_packet(int(info["mtu"]))
            self.block = int(info.get("hadamard") or 0)
            rate_mbit = float(info.get("rate_mbit") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"server sent unusable LTP parameters {info!r}: {exc}") from None
        # From the TCP connection's own local address: the server accepts this session's
        # packets only from the host its TCP peer is on.
        self.udp = make_socket(self.tcp.sock.getsockname()[0], 0)
        self.udp.connect((self.host, port))
        self.sender = Sender(self.udp)
        self.packets = PacketBuffer(self.per_packet)
        self._rotated = np.empty(0, dtype=np.float32)
        self.pacer = Pacer(rate_mbit * 125_000 if rate_mbit else None, phase=secrets.randbelow(8))
        self._state: dict[str, Any] = {"round": 0, "done": True}
        self._wake_r, self._wake_w = os.pipe()
        self.ready = True
        self._thread = threading.Thread(target=self._send_loop, name="ltp-send", daemon=True)
        self._thread.start()

    def send(self, frame: Frame, payload: memoryview | bytes | None = None) -> None:
        if frame.kind != Kind.PUSH or payload is None or not self.ready:
            return self.tcp.send(frame, payload)
        values = np.frombuffer(payload, dtype=np.float32)
        with self._lock:
            self.round += 1
            data = values
            if self.block:
                size = hadamard.rotated_len(values.size, self.block)
                if self._rotated.size < size:
                    self._rotated = np.empty(size, dtype=np.float32)
                data = hadamard.rotate(values, self._rotated, self.block, (self.session, self.round))
            self.packets.fill(data, job=self.job, session=self.session, round_=self.round, shard=frame.shard)
            frame.meta = {**(frame.meta or {}), "ltp": [self.round, data.nbytes, values.nbytes]}
            self.tcp.send(frame)
            self.ltp_bytes += values.nbytes
            self.pacer.next_round()
            self._state = {"round": self.round, "done": False, "next": 0, "resend": np.empty(0, dtype=np.int64),
                           "must": {0: [0.0, RTO_FIRST_S], self.packets.total - 1: [0.0, RTO_FIRST_S]},
                           "due": time.monotonic()}
        os.write(self._wake_w, b"x")

    def recv(self, sink: PayloadSink | None = None) -> Frame:
        frame = self.tcp.recv(sink)
        if frame.kind == Kind.AUTH_OK and frame.meta and "ltp" in frame.meta:
            self._open(frame.meta.pop("ltp"))
        elif frame.kind in (Kind.ACK, Kind.ERROR, Kind.STOP) and self.ready:
            with self._lock:
                self._state["done"] = True  # the server has the round: stop sending it
        return frame

    def close(self) -> None:
        if self._closed:
            return  # a client may close twice (its owner, then the owner's owner)
        self._closed = True
        if self.ready:
            os.write(self._wake_w, b"x")
        self.tcp.close()
        if self._thread is not None:
            self._thread.join(1.0)
        if self.ready:
            self.udp.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # --- the sender thread ---------------------------------------------------------
    def _send_loop(self) -> None:
        buf = bytearray(1 << 16)
        most = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // self.packets.stride))
        while not self._closed:
            # select, not poll: its timeout has microseconds, so pacing gaps are slept, not spun
            readable, _, _ = select.select([self.udp, self._wake_r], [], [], self._next_wakeup())
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if self.udp in readable:
                self._read_acks(buf)
            if self._closed:
                return
            try:
                self._send_due(most)
            except OSError:
                time.sleep(0.01)  # the server is gone (ICMP unreachable); the TCP side will say so

    def _next_wakeup(self) -> float | None:
        with self._lock:
            st = self._state
            if st["done"]:
                return None
            now = time.monotonic()
            times = [due for due, _ in st["must"].values()]
            if st["next"] < self.packets.total or st["resend"].size:
                times.append(st["due"])
            return max(0.0, min(times) - now) if times else None

    def _read_acks(self, buf: bytearray) -> None:
        while True:
            try:
                nbytes = self.udp.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP errors of a vanished server surface here; the TCP side decides
            try:
                _, head, ok = parse_batch(buf, nbytes, nbytes)
                h = head[0]
                if not ok[0] or h["type"] != ACK or h["session"] != self.session or h["job"] != self.job:
                    continue
                rate, _received, _lost, bits = decode_ack(h, memoryview(buf)[HEADER_SIZE:nbytes])
            except PacketError:
                continue
            with self._lock:
                st = self._state
                if int(h["round"]) != st["round"]:
                    continue
                flags, base = int(h["flags"]), int(h["seq"])
                if flags & CLOSED:
                    st["done"] = True
                    self.pacer.on_report(rate)
                elif flags & RESEND:
                    self.pacer.on_report(rate)  # pace the resends at what is getting through
                    missing = np.flatnonzero(~bits) + base
                    st["resend"] = np.union1d(st["resend"], missing[missing < self.packets.total])
                    st["due"] = min(st["due"], time.monotonic())
                else:
                    for seq in (np.flatnonzero(bits) + base).tolist():
                        st["must"].pop(seq, None)

    def _send_due(self, most: int) -> None:
        with self._lock:
            st = self._state
            if st["done"]:
                return
            now = time.monotonic()
            p = self.packets
            for seq, timer in list(st["must"].items()):
                if timer[0] and now >= timer[0] and st["next"] > seq:
                    p.mark_retransmitted(np.array([seq]))
                    self.sender.send(memoryview(p.rows[seq, :p.wire_len(seq)]), p.stride, 1)
                    timer[1] = min(RTO_MAX_S, 2 * timer[1])
                    timer[0] = now + timer[1]
            if now < st["due"]:
                return
            burst = self.pacer.burst(p.stride, most)
            if st["next"] < p.total:
                start = st["next"]
                stop = min(p.total, start + burst)
                data = p.rows.reshape(-1)[start * p.stride:(stop - 1) * p.stride + p.wire_len(stop - 1)]
                self.sender.send(memoryview(data), p.stride, stop - start)
                st["next"] = stop
                for seq, timer in st["must"].items():
                    if start <= seq < stop:
                        timer[0] = now + timer[1]
                sent = stop - start
            elif st["resend"].size:
                seqs, st["resend"] = st["resend"][:burst], st["resend"][burst:]
                p.mark_retransmitted(seqs)
                batch = p.rows[seqs]
                tail = p.wire_len(int(seqs[-1]))
                data = batch.reshape(-1)[:(seqs.size - 1) * p.stride + tail]
                self.sender.send(memoryview(data), p.stride, seqs.size)
                sent = seqs.size
            else:
                return
            rate = self.pacer.rate
            # The next burst is due on the ideal timeline, not `now` + gap: a thread that
            # woke up late (the CPU was busy) catches up, so what the receiver measures is
            # the pacing rate and not the pacing rate less every oversleep. The credit is
            # capped at a few bursts so that a long stall does not end in one big burst.
            gap = sent * p.stride / rate if rate else 0.0
            st["due"] = max(st["due"], now - 4 * gap) + gap


class LtpTransport(Transport):
    """``--transport ltp``: reliable TCP for control and pulls, loss-tolerant UDP for pushes."""

    name = "ltp"

    def __init__(self, options: Any = None, shm: bool = True):
        super().__init__(_options(options), shm=False)  # pushes over the network, always

    def listen(self, host: str, port: int = 0) -> LtpListener:
        return LtpListener(host, port, self.options)

    def connect(self, address: str, timeout: float = 5.0) -> LtpClientConnection:
        host, _ = split_address(address)
        return LtpClientConnection(TcpTransport(shm=False).connect(address, timeout), host)
