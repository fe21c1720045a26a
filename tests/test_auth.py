"""HMAC challenge-response over real loopback sockets."""

import threading

import pytest

from stalwart.transport import AuthError, Frame, Kind, ProtocolError, TcpTransport, dial, server_handshake


def serve_once(token: bytes):
    listener = TcpTransport().listen("127.0.0.1", 0)
    outcome = {}

    def run():
        conn = listener.accept()
        try:
            server_handshake(conn, token)
            outcome["ok"] = True
            conn.max_payload = 8
            outcome["frame"] = conn.recv()
        except Exception as exc:  # the test inspects what the server saw
            outcome["error"] = exc
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread, outcome


def test_right_token_authenticates_both_ways():
    listener, thread, outcome = serve_once(b"k" * 32)
    conn = dial(listener.address, b"k" * 32)
    conn.send(Frame(Kind.REQUEST, meta={"op": "x"}))
    thread.join(5)
    assert outcome.get("ok") and outcome["frame"].meta == {"op": "x"}
    conn.close()
    listener.close()


def test_wrong_token_is_refused_with_a_reason():
    listener, thread, outcome = serve_once(b"k" * 32)
    with pytest.raises(AuthError, match="wrong job token"):
        dial(listener.address, b"w" * 32)
    thread.join(5)
    assert isinstance(outcome.get("error"), AuthError)
    listener.close()


def test_client_that_skips_the_handshake_is_refused():
    listener, thread, outcome = serve_once(b"k" * 32)
    conn = TcpTransport().connect(listener.address)
    conn.recv()  # the challenge
    conn.send(Frame(Kind.PUSH, shard=0, worker=0), b"\0" * 4)  # payload before authenticating
    thread.join(5)
    assert isinstance(outcome.get("error"), ProtocolError)
    assert "limit of 0 bytes" in str(outcome["error"])
    conn.close()
    listener.close()
