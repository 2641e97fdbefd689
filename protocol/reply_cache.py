"""The control server's reply cache: what makes a retried request run at most once.

A client sends one id per logical request and the same id with every retry of it (the ZeroMQ
guide's Lazy Pirate, control.py). The server keeps the replies to the last
`REPLY_CACHE_ENTRIES` ids (at most `REPLY_CACHE_BYTES`) and answers a repeated id from here
without running the command again, so a command slower than the client's timeout still runs
once. docs/CONTRACTS.md states the contract; `ControlServer.replies` is the one instance.
"""
from __future__ import annotations

import collections
import hashlib
import json

from .errors import MalformedMessage
from .logs import clip

REPLY_CACHE_ENTRIES = 256           # replies kept for retried ids ...
REPLY_CACHE_BYTES = 8 * 1024 * 1024  # ... and their bytes at most


def request_digest(msg: dict) -> bytes:
    """What identifies a request apart from its id: the rest of it, canonically."""
    rest = {k: v for k, v in msg.items() if k != "id"}
    return hashlib.blake2b(json.dumps(rest, sort_keys=True).encode(), digest_size=16).digest()


class ReplyCache:
    """The replies to the last requests that carried an id, so a retry is answered, not re-run.

    Bounded twice: at most `entries` replies and at most `max_bytes` of reply bytes (oldest
    evicted first); a reply bigger than a quarter of `max_bytes` is not kept (such replies
    come from read-only commands like `logs`, which are safe to run again). Each entry keeps
    a digest of the request, so an id reused for a different request is refused instead of
    answered with the other request's reply.
    """

    def __init__(self, entries: int = REPLY_CACHE_ENTRIES, max_bytes: int = REPLY_CACHE_BYTES):
        self.entries, self.max_bytes = entries, max_bytes
        self._items: collections.OrderedDict[str, tuple[bytes, bytes]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, rid: str, digest: bytes) -> bytes | None:
        item = self._items.get(rid)
        if item is None:
            return None
        if item[0] != digest:
            raise MalformedMessage(f"request id {clip(rid, 80)!r} was already used for another "
                                   f"request; send a new id with every request (a retry "
                                   f"resends the same request with the same id)")
        self.hits += 1
        return item[1]

    def put(self, rid: str, digest: bytes, reply: bytes) -> None:
        if len(reply) > self.max_bytes // 4:
            return
        old = self._items.pop(rid, None)
        if old is not None:
            self.bytes -= len(old[1])
        self._items[rid] = (digest, reply)
        self.bytes += len(reply)
        while len(self._items) > self.entries or self.bytes > self.max_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self.bytes -= len(evicted)
