"""Test data for the trainer tests: a small learnable cache and a live ring producer process.

Class c of K draws a bright square in position c of a frame (video, uint8 (T, C, H, W)) and a
vector whose mean is shifted in coordinate c (vec, float32 (8,)), plus noise: easy enough that a
tiny model learns it in a few dozen CPU steps, hard enough that an untrained one is at chance.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np

from producer.cache_writer import CacheWriter
from protocol.schema import SampleMeta, SampleSchema

CLASSES = ["a", "b", "c"]


def make_sample(rng: np.random.Generator, label: int, *, hw: int = 16, channels: int = 3,
                frames: int = 2) -> dict[str, np.ndarray]:
    img = rng.integers(0, 60, size=(frames, channels, hw, hw), dtype=np.uint8)
    q = hw // 3
    img[:, :, :, label * q: (label + 1) * q] += 150
    vec = rng.normal(0.0, 1.0, 8).astype(np.float32)
    vec[label] += 2.0
    return {"video": img, "vec": vec}


def build_cache(directory: Path, n_train: int = 120, n_val: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with CacheWriter(directory, classes=CLASSES) as w:
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                label = i % len(CLASSES)
                arrays = make_sample(rng, label)
                schema = SampleSchema.from_arrays(arrays)
                w.add(f"{split}/{CLASSES[label]}/{i:04d}", "fp", split, schema,
                      SampleMeta(label=label, index=i, source="synthetic"), arrays)
        w.commit()
    return directory


def unique_name(prefix: str = "mmt") -> str:
    return f"{prefix}{os.getpid()}{uuid.uuid4().hex[:8]}"


def _produce(name: str, mode: str, rate: float, gray_after: int | None, start_index: int,
             stop, seed: int, alternate_schemas: bool = False, label: int | None = None) -> None:
    from protocol.ring import RingConfig, RingWriter

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = np.random.default_rng(seed)
    fixed_label = label
    w = RingWriter.create(RingConfig(name=name, slots=16, slot_bytes=64 << 10, mode=mode))
    try:
        i = start_index
        gen = 1
        w.set_generation(gen)
        t_next = time.monotonic()
        while not stop.is_set():
            label = i % len(CLASSES)
            if gray_after is not None and i - start_index >= gray_after:
                if gen == 1:
                    gen = 2
                    w.set_generation(gen)
                arrays = make_sample(rng, label, hw=12, channels=1)
            else:
                arrays = make_sample(rng, label)
            if alternate_schemas and i % 2:
                # An unknown sensor only every other recording carries: a second schema
                # interleaved with the first, sample by sample.
                arrays["imu"] = rng.standard_normal(6).astype(np.float32)
            schema = SampleSchema.from_arrays(arrays)
            meta_label = label if fixed_label is None else fixed_label
            try:
                w.publish(schema, SampleMeta(label=meta_label, index=i, generation=gen,
                                             source="live"),
                          arrays, timeout=0.2)
            except Exception as e:  # RingFull in lossless mode with no reader: try again
                if type(e).__name__ != "RingFull":
                    raise
                continue
            i += 1
            if rate:
                t_next += 1.0 / rate
                delay = t_next - time.monotonic()
                if delay > 0:
                    stop.wait(delay)  # paces the producer; wakes at once on stop
    finally:
        w.close()


class LiveProducer:
    """A RingWriter in its own process, publishing learnable samples until stopped."""

    def __init__(self, name: str, *, mode: str = "lossy", rate: float = 0.0,
                 gray_after: int | None = None, start_index: int = 0, seed: int = 1,
                 alternate_schemas: bool = False, label: int | None = None):
        """`label`: every sample's label (-1: unlabelled, as a live source without --label);
        None: the class drawn into the sample."""
        ctx = mp.get_context("fork")
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(target=_produce, args=(name, mode, rate, gray_after, start_index,
                                                       self.stop_event, seed, alternate_schemas,
                                                       label),
                                daemon=True)
        self.name = name

    def start(self) -> "LiveProducer":
        self.proc.start()
        deadline = time.monotonic() + 20
        shm = Path(f"/dev/shm/{self.name}")
        while not (shm.exists() and shm.stat().st_size >= 256):  # created and sized
            if time.monotonic() > deadline or not self.proc.is_alive():
                raise RuntimeError(f"producer for ring {self.name} did not start")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL: the ring stays behind, stale, like after a crash."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.stop_event.set()
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()


def cleanup_ring(name: str) -> None:
    """Remove what the ring `name` left in /dev/shm (tests/_rings.py)."""
    from _rings import remove_shm

    remove_shm(name)
