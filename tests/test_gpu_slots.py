"""GPU ring slots: descriptor and sidecar table formats, fallback selection, and the whole
descriptor + slot-seqlock protocol across real processes. The "shm" backend runs that protocol
over host shared memory so it is exercised here; the CUDA tests run it over CUDA IPC and skip
without a GPU (docs/gpu.md lists them as checks still to run on one)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import posix_ipc
import pytest
import torch

from producer.gpu_slot_writer import NO_CUDA_MESSAGE, GpuSlotWriter, choose_backend, open_writer
from protocol.errors import NotARing, RingError, SchemaError, VersionMismatch
from protocol.gpu_slots import (DESCRIPTOR_BYTES, DESCRIPTOR_SCHEMA, GPU_TABLE_VERSION,
                                GpuDescriptor, GpuSlotTable, PoolExport, StaleGpuTable,
                                is_descriptor, table_name)
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema
from trainer import gpu_slot_reader as gpu_ring
from trainer.gpu_slot_reader import GpuRingReader, open_reader, select_path

sys.path.insert(0, str(Path(__file__).parent))
from _gpu_slot_producer import payload_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRODUCER = ROOT / "tests" / "_gpu_slot_producer.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU with CUDA (CUDA IPC ring slots)")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


@pytest.fixture
def ring_name():
    name = f"mmgpu{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield name
    for n in ("/" + name, table_name(name), table_name(name) + ".pool"):
        try:
            posix_ipc.unlink_shared_memory(n)
        except posix_ipc.ExistentialError:
            pass


@pytest.fixture(autouse=True)
def _forget_logged_once(monkeypatch):
    import protocol.gpu_slots as wire
    monkeypatch.setattr(wire, "_no_cuda_said", set())


class Producer:
    """tests/_gpu_slot_producer.py in its own process: ready -> go -> done -> stop."""

    def __init__(self, ring: str, **kw):
        args = [sys.executable, str(PRODUCER), ring]
        for k, v in kw.items():
            args += [f"--{k}", str(v)]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", f"producer did not start: {line!r}"

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("stop\n")
                self.p.stdin.flush()
            except BrokenPipeError:
                pass
        try:
            self.p.wait(30)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()


def _expected(nbytes: int, index: int, device="cpu") -> torch.Tensor:
    return payload_bytes(nbytes, index, device)


# --- formats --------------------------------------------------------------------------------

def test_descriptor_round_trips_slot_sequence_and_schema():
    schema = SampleSchema((ModalitySpec("video", "uint8", (8, 3, 64, 64)),
                           ModalitySpec("lidar", "float32", (3, 32, 32))))
    buf = np.zeros(DESCRIPTOR_BYTES, np.uint8)
    GpuDescriptor(5, 2 * 41 + 2, schema).pack_into(buf)
    cache: dict = {}
    d = GpuDescriptor.unpack_from(buf, cache)
    assert (d.slot, d.seq, d.schema) == (5, 84, schema)
    assert cache == {schema.schema_id: schema}   # parsed once, then served from the cache
    assert GpuDescriptor.unpack_from(buf, cache).schema is cache[schema.schema_id]
    assert is_descriptor(DESCRIPTOR_SCHEMA) and not is_descriptor(schema)


def test_descriptor_of_another_version_is_refused_naming_both_versions():
    buf = np.zeros(DESCRIPTOR_BYTES, np.uint8)
    GpuDescriptor(0, 2, SampleSchema((ModalitySpec("v", "uint8", (4,)),))).pack_into(buf)
    buf[4] = 9
    with pytest.raises(VersionMismatch, match="version 9.*version 1"):
        GpuDescriptor.unpack_from(buf)
    buf[:4] = np.frombuffer(b"XXXX", np.uint8)
    with pytest.raises(SchemaError, match="magic"):
        GpuDescriptor.unpack_from(buf)


def _table(ring: str, epoch: int = 7, slots: int = 4) -> GpuSlotTable:
    ex = PoolExport("shm", -1, "", b"/x.pool", slots * 4096)
    return GpuSlotTable.create(ring, epoch=epoch, slots=slots, slot_bytes=4000,
                               slot_stride=4096, export=ex)


def test_table_round_trips_export_and_checks_epoch(ring_name):
    ex = PoolExport("cuda", 0, "GPU-1234", b"h" * 64, 1 << 20, 512, b"/torch_1_2", 3,
                    b"e" * 64, True)
    with GpuSlotTable.create(ring_name, epoch=11, slots=3, slot_bytes=1000, slot_stride=4096,
                             export=ex) as t:
        r = GpuSlotTable.attach(ring_name, 11)
        assert r.export == ex and (r.slots, r.slot_bytes, r.slot_stride) == (3, 1000, 4096)
        odd = t.begin(2, 20)
        assert r.seq(2) == 41            # odd while the producer writes sample 20
        assert t.end(2, odd) == 42 == r.seq(2)
        r.close()
        with pytest.raises(StaleGpuTable, match="epoch 0xb.*epoch 0xc"):
            GpuSlotTable.attach(ring_name, 12)
    assert not Path("/dev/shm" + table_name(ring_name)).exists()   # producer unlinks


def test_table_of_another_version_is_refused_naming_both_versions(ring_name):
    with _table(ring_name) as t:
        t._mm[8:12] = (GPU_TABLE_VERSION + 1).to_bytes(4, "little")
        with pytest.raises(VersionMismatch, match=f"version {GPU_TABLE_VERSION + 1}.*version "
                                                  f"{GPU_TABLE_VERSION}"):
            GpuSlotTable.attach(ring_name, 7)
        t._mm[0:8] = b"NOTATABL"
        with pytest.raises(NotARing, match="not an mmfeed GPU slot table"):
            GpuSlotTable.attach(ring_name, 7)


# --- fallback selection ---------------------------------------------------------------------

@no_cuda
def test_without_cuda_the_producer_falls_back_to_the_host_ring_and_says_so_once(ring_name,
                                                                                 caplog):
    caplog.set_level(logging.INFO)
    assert choose_backend("auto") is None
    assert choose_backend("auto") is None
    assert [r.getMessage() for r in caplog.records].count(NO_CUDA_MESSAGE) == 1
    with _table(ring_name, epoch=1):   # a table left by an earlier GPU producer
        pass
    stale = GpuSlotTable.create(ring_name, epoch=1, slots=1, slot_bytes=10, slot_stride=4096,
                                export=PoolExport("shm", -1, "", b"/x", 4096))
    stale._owner = False               # "dies" without unlinking it
    stale.close()
    with open_writer(RingConfig(name=ring_name, slots=4, slot_bytes=4096)) as w:
        assert isinstance(w, RingWriter)
        assert not Path("/dev/shm" + table_name(ring_name)).exists()


@no_cuda
def test_asking_for_cuda_without_a_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        choose_backend("cuda")
    with pytest.raises(ValueError, match="expected 'auto', 'off'"):
        choose_backend("nvdec")
    assert choose_backend("off") is None and choose_backend("shm") == "shm"


@no_cuda
def test_without_cuda_the_trainer_reads_the_host_ring_and_says_so_once(ring_name, caplog):
    caplog.set_level(logging.INFO)
    with RingWriter.create(RingConfig(name=ring_name, slots=4, slot_bytes=4096)):
        assert select_path(ring_name) == "host"
        r = open_reader(ring_name)
        assert isinstance(r, RingReader)
        r.close()
    assert [rec.getMessage() for rec in caplog.records].count(gpu_ring.NO_CUDA_MESSAGE) == 1


@no_cuda
def test_a_ring_with_frames_in_gpu_memory_cannot_be_read_without_cuda(ring_name):
    with RingWriter.create(RingConfig(name=ring_name, slots=4, slot_bytes=4096)) as w:
        ex = PoolExport("cuda", 0, "GPU-0", b"h" * 64, 1 << 20)
        with GpuSlotTable.create(ring_name, epoch=w.stats().epoch, slots=8, slot_bytes=1 << 17,
                                 slot_stride=1 << 17, export=ex):
            with pytest.raises(RingError, match="keeps frames in GPU memory.*no CUDA device"):
                select_path(ring_name)


def test_gpu_reader_refuses_a_host_payload_sample_with_a_clear_error(ring_name):
    with RingWriter.create(RingConfig(name=ring_name, slots=4, slot_bytes=1 << 16)) as w:
        r = GpuRingReader.attach(ring_name, device="cpu", start="oldest")
        try:
            w.publish(SampleSchema((ModalitySpec("v", "uint8", (16,)),)), SampleMeta(index=0),
                      {"v": np.zeros(16, np.uint8)})
            with pytest.raises(SchemaError, match="host memory, not a GPU slot descriptor"):
                r.receive_batch_into(torch.empty(2, 64, dtype=torch.uint8), timeout=5)
        finally:
            r.close()


def test_writer_rejects_a_sample_that_does_not_fit_before_touching_the_ring(ring_name):
    cfg = RingConfig(name=ring_name, slots=2, slot_bytes=4096)
    with GpuSlotWriter.create(cfg, backend="shm") as w:
        big = SampleSchema((ModalitySpec("v", "uint8", (8192,)),))
        with pytest.raises(SchemaError, match="exceeds the GPU slot size 4096"):
            w.publish(big, SampleMeta(), {"v": np.zeros(8192, np.uint8)})
        small = SampleSchema((ModalitySpec("v", "uint8", (16,)),))
        with pytest.raises(SchemaError, match="expected uint8"):
            w.publish(small, SampleMeta(), {"v": np.zeros(16, np.float32)})
        assert w.published == 0


# --- the protocol across processes, over host shared memory ----------------------------------

def _read_all(r: GpuRingReader, out: torch.Tensor, n: int) -> list[int]:
    seen: list[int] = []
    while len(seen) < n:
        got = r.receive_batch_into(out[:n - len(seen)], timeout=30)
        assert got is not None, f"no sample after {len(seen)}"
        schema, metas = got
        for row, meta in enumerate(metas):
            nb = schema.payload_nbytes
            assert torch.equal(out[row, :nb].cpu(), _expected(nb, meta.index)), \
                f"sample {meta.index} differs from what the producer wrote"
            seen.append(meta.index)
    return seen


def test_reader_process_gets_every_sample_exactly_in_lossless_mode(ring_name):
    prod = Producer(ring_name, backend="shm", count=200, mode="lossless", nbytes=1 << 14)
    try:
        with GpuRingReader.attach(ring_name, device="cpu", start="oldest") as r:
            prod.go()
            seen = _read_all(r, torch.empty(6, 1 << 14, dtype=torch.uint8), 200)
            assert seen == list(range(200))
            st = r.stats()
            assert st.mappings == 1 and st.dropped == 0 and st.received == 200
    finally:
        prod.stop()


def test_reader_never_returns_a_torn_gpu_slot_under_a_hammering_lossy_producer(ring_name):
    nbytes = 1 << 18    # copies long enough for the producer to lap them now and then
    prod = Producer(ring_name, backend="shm", count=0, mode="lossy", nbytes=nbytes, slots=2)
    try:
        with GpuRingReader.attach(ring_name, device="cpu", start="newest") as r:
            prod.go()
            seen = _read_all(r, torch.empty(4, nbytes, dtype=torch.uint8), 300)
            assert seen == sorted(seen) and len(set(seen)) == len(seen)
            assert r.stats().mappings == 1
    finally:
        prod.stop()


def test_a_schema_change_mid_batch_waits_for_the_next_batch(ring_name):
    prod = Producer(ring_name, backend="shm", count=20, mode="lossless", nbytes=4096, schemas=2)
    try:
        with GpuRingReader.attach(ring_name, device="cpu", start="oldest") as r:
            prod.go()
            out = torch.empty(8, 4096, dtype=torch.uint8)
            sizes = []
            for _ in range(4):
                schema, metas = r.receive_batch_into(out, timeout=2)
                assert len({m.generation for m in metas}) == 1   # never two schemas in a batch
                sizes.append((schema.names[0], [m.index for m in metas]))
            assert sizes == [("video", [0, 1, 2, 3, 4]), ("other", [5, 6, 7, 8, 9]),
                             ("video", [10, 11, 12, 13, 14]), ("other", [15, 16, 17, 18, 19])]
    finally:
        prod.stop()


def test_lossless_reader_trains_from_the_slot_itself_while_it_holds_its_position(ring_name):
    prod = Producer(ring_name, backend="shm", count=40, mode="lossless", nbytes=4096, slots=2)
    try:
        with GpuRingReader.attach(ring_name, device="cpu", start="oldest") as r:
            prod.go()
            for i in range(40):
                v = r.receive_slot(timeout=30)
                assert v.meta.index == i
                assert torch.equal(v.tensors["video"], _expected(4096, i))
                assert v.still_valid()
            assert r.stats().copies == 0     # zero-copy: nothing was copied out of the slots
    finally:
        prod.stop()


# --- CUDA: the same protocol over CUDA IPC (run on a GPU machine; docs/gpu.md) ----------------

@needs_cuda
def test_cuda_reader_process_reads_producer_gpu_slots_exactly_and_maps_handles_once(ring_name):
    nbytes = 1 << 20
    prod = Producer(ring_name, backend="cuda", count=300, mode="lossless", nbytes=nbytes)
    try:
        with GpuRingReader.attach(ring_name, device="cuda", start="oldest") as r:
            prod.go()
            out = torch.empty(8, nbytes, dtype=torch.uint8, device="cuda")
            seen = []
            while len(seen) < 300:
                schema, metas = r.receive_batch_into(out[:300 - len(seen)], timeout=30)
                for row, meta in enumerate(metas):
                    assert torch.equal(out[row], _expected(nbytes, meta.index, "cuda"))
                    seen.append(meta.index)
            assert seen == list(range(300))
            st = r.stats()
            assert st.mappings == 1 and st.dropped == 0
            assert st.syncs < st.copies      # one host wait per window, not per sample
            assert r._pool.memory.device.type == "cuda" and out.device.type == "cuda"
    finally:
        prod.stop()


@needs_cuda
def test_cuda_reader_never_returns_a_torn_gpu_slot_under_a_hammering_lossy_producer(ring_name):
    nbytes = 8 << 20
    prod = Producer(ring_name, backend="cuda", count=0, mode="lossy", nbytes=nbytes, slots=2)
    try:
        with GpuRingReader.attach(ring_name, device="cuda", start="newest") as r:
            prod.go()
            out = torch.empty(4, nbytes, dtype=torch.uint8, device="cuda")
            n = 0
            while n < 500:
                schema, metas = r.receive_batch_into(out, timeout=30)
                for row, meta in enumerate(metas):
                    assert torch.equal(out[row], _expected(nbytes, meta.index, "cuda"))
                n += len(metas)
            assert r.stats().mappings == 1
    finally:
        prod.stop()


@needs_cuda
def test_cuda_lossless_reader_trains_from_the_gpu_slot_itself(ring_name):
    prod = Producer(ring_name, backend="cuda", count=50, mode="lossless", nbytes=1 << 16)
    try:
        with GpuRingReader.attach(ring_name, device="cuda", start="oldest") as r:
            prod.go()
            for i in range(50):
                v = r.receive_slot(timeout=30)
                assert v.tensors["video"].is_cuda and v.meta.index == i
                assert torch.equal(v.tensors["video"], _expected(1 << 16, i, "cuda"))
            assert r.stats().copies == 0 and r.stats().mappings == 1
    finally:
        prod.stop()


@needs_cuda
def test_with_cuda_both_sides_pick_gpu_slots_automatically(ring_name):
    assert choose_backend("auto") == "cuda"
    with open_writer(RingConfig(name=ring_name, slots=4, slot_bytes=1 << 16), gpu="auto") as w:
        assert isinstance(w, GpuSlotWriter)
        assert select_path(ring_name) == "gpu-slots"
        # and "off" keeps the host ring even on a GPU machine
    with open_writer(RingConfig(name=ring_name, slots=4, slot_bytes=1 << 16), gpu="off") as w:
        assert isinstance(w, RingWriter) and select_path(ring_name) == "host"
