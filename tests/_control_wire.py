"""Control requests as raw bytes, past every check `ControlClient` makes: what the tests of
malformed, oversized and hostile messages send to a `ControlServer` or a running daemon.
Test files import it after `sys.path.insert(0, str(Path(__file__).parent))`."""
from __future__ import annotations

import json

import zmq


def raw_reply(endpoint: str, payload: bytes, timeout_ms: int = 10_000) -> bytes | None:
    """Send `payload` as it is on a fresh REQ socket; the reply's bytes, or None when nothing
    answers within `timeout_ms` (a message the transport drops gets no reply at all)."""
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send(payload)
        if not s.poll(timeout_ms, zmq.POLLIN):
            return None
        return s.recv()
    finally:
        s.close(linger=0)


def raw_request(endpoint: str, payload: bytes, timeout_ms: int = 10_000) -> dict | None:
    """`raw_reply`, decoded from JSON (None when nothing answered)."""
    raw = raw_reply(endpoint, payload, timeout_ms)
    return None if raw is None else json.loads(raw)


def must_answer(endpoint: str, payload: bytes, timeout_ms: int = 10_000) -> dict:
    """`raw_request` to a daemon that must answer: an AssertionError when it is silent."""
    reply = raw_request(endpoint, payload, timeout_ms)
    assert reply is not None, f"no reply from {endpoint} within {timeout_ms} ms"
    return reply
