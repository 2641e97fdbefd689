"""Demuxing with PyAV without leaking a packet per stopped decode loop.

WHY: PyAV 18's `InputContainer.demux()` is a compiled generator that allocates its read packet
(`av_packet_alloc`) and a stream mask, freed in its `finally`. In this wheel (Cython, limited
API) that `finally` runs when the generator is *closed*, not when it is merely deallocated -
and `container.decode()` is a generator over `demux()` that drops its inner generator without
closing it. So every decode loop that stops early (a clip of 8 frames out of a long file, the
audio of a one-second window) lost ~300 bytes of native memory: valgrind shows the two blocks
"definitely lost" under InputContainer.demux; RSS grew ~300 B per clip in a loop, ~20 MB per
60k samples in the producer soak, invisible to tracemalloc (native, not Python objects).
Draining the file would avoid it at the cost of decoding everything; closing the demux
generator ourselves costs nothing, so every decode loop here goes through `decoded_frames`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def demuxed(container, *streams) -> Iterator[Iterator]:
    """`container.demux(*streams)`, closed on the way out however the loop ends."""
    packets = container.demux(*streams)
    try:
        yield packets
    finally:
        packets.close()


@contextmanager
def decoded_frames(container, stream) -> Iterator[Iterator]:
    """The frames of `stream`, as `container.decode(stream)` yields them (flushed at the end),
    with the underlying demux generator closed on the way out."""
    with demuxed(container, stream) as packets:
        yield (frame for packet in packets for frame in packet.decode())
