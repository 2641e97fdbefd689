"""Ring throughput and wake-up latency, beside a plain memcpy of the same bytes.

    python -m bench.ring [--json] [--quick]

One writer process and 1, 2, 4 reader processes; payloads of 64 KiB, 1 MiB, 8 MiB. The
figure is GB/s delivered to each reader (every sample, lossless mode, copied with
`receive_into` into a preallocated buffer); the limit is a single-threaded `np.copyto`
between preallocated arrays of the same size, measured in the same run. In the same table,
with one reader: what a user would otherwise pick - `multiprocessing.Queue` of numpy arrays,
`multiprocessing.shared_memory` guarded by a lock (one slot, two semaphores), and Eclipse
iceoryx2's Python bindings (zero-copy loan/send, reader copies out; it polls, it has no
blocking receive on a publish-subscribe port). Wake-up latency: time from just before
`publish()` to the return of a reader that was asleep on its semaphore, p50/p99.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid

import numpy as np

from bench._common import machine, report, want_json
from protocol.ring import RingConfig, RingReader, RingWriter
from protocol.schema import ModalitySpec, SampleMeta, SampleSchema

KIB, MIB = 1 << 10, 1 << 20
SIZES = (64 * KIB, MIB, 8 * MIB)
READERS = (1, 2, 4)
FORK = mp.get_context("fork")


def _count(size: int, budget: float) -> int:
    return int(min(4000, max(24, budget / size)))


def _schema(size: int) -> SampleSchema:
    return SampleSchema((ModalitySpec("payload", "uint8", (size,)),))


# --- limit: memcpy -----------------------------------------------------------------------


def memcpy_gbps(size: int, budget: float) -> float:
    src = np.random.default_rng(0).integers(0, 255, size, np.uint8)
    dst = np.empty_like(src)
    k = _count(size, budget / 4)
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(k):
            np.copyto(dst, src)
        rates.append(k * size / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def memcpy_cold_gbps(size: int, budget: float, buffers: int = 8) -> float:
    """The same copy, but from `buffers` rotating sources: the working set of an 8-slot ring,
    so the source is not hot in this core's cache - as a slot written by another core is not."""
    srcs = [np.full(size, i, np.uint8) for i in range(buffers)]
    dst = np.empty(size, np.uint8)
    k = _count(size, budget / 4)
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(k):
            np.copyto(dst, srcs[i % buffers])
        rates.append(k * size / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


# --- the ring ----------------------------------------------------------------------------


def _ring_writer(name, size, count, n_readers, ready, go, done):
    schema = _schema(size)
    arrays = {"payload": np.full(size, 7, np.uint8)}
    with RingWriter.create(RingConfig(name, slots=8, slot_bytes=size, mode="lossless")) as w:
        ready.set()
        go.wait(60)
        for n in range(count):
            w.publish(schema, SampleMeta(index=n), arrays, timeout=60)
        done.wait(120)


def _ring_reader(name, size, count, ready, q):
    out = np.empty(size, np.uint8)
    with RingReader.attach(name, start="next") as r:
        ready.set()
        r.receive_into(out, timeout=60)
        t0 = time.perf_counter()
        for _ in range(count - 1):
            if r.receive_into(out, timeout=60) is None:
                raise RuntimeError("reader timed out")
        dt = time.perf_counter() - t0
        q.put(((count - 1) * size / dt / 1e9, (count - 1) / dt, r.stats().dropped))


def bench_ring(size: int, n_readers: int, budget: float) -> tuple[float, float]:
    """Median over readers of (GB/s, samples/s) delivered to each reader."""
    name = f"mmfeed-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    count = _count(size, budget)
    ready, go, done, q = FORK.Event(), FORK.Event(), FORK.Event(), FORK.Queue()
    w = FORK.Process(target=_ring_writer, args=(name, size, count, n_readers, ready, go, done))
    w.start()
    assert ready.wait(30), "ring writer did not start"
    rdy = [FORK.Event() for _ in range(n_readers)]
    readers = [FORK.Process(target=_ring_reader, args=(name, size, count, e, q)) for e in rdy]
    for p in readers:
        p.start()
    for e in rdy:
        assert e.wait(30), "ring reader did not start"
    go.set()
    res = [q.get(timeout=300) for _ in readers]
    done.set()
    for p in readers + [w]:
        p.join(30)
    assert all(d == 0 for _, _, d in res), "lossless ring dropped samples"
    return statistics.median(r[0] for r in res), statistics.median(r[1] for r in res)


def _latency_writer(name, samples, ready, go, done):
    schema = _schema(64)
    arrays = {"payload": np.zeros(64, np.uint8)}
    rng = np.random.default_rng(1)
    with RingWriter.create(RingConfig(name, slots=4, slot_bytes=4096, mode="lossless")) as w:
        ready.set()
        go.wait(60)
        for n in range(samples):
            # Pause so the reader is asleep on its semaphore (what is measured is a wake-up).
            time.sleep(0.0005 + rng.random() * 0.001)
            w.publish(schema, SampleMeta(index=n, timestamp_ns=time.monotonic_ns()), arrays,
                      timeout=60)
        done.wait(60)


def _latency_reader(name, samples, ready, q):
    out = np.empty(4096, np.uint8)
    lat = np.empty(samples, np.int64)
    with RingReader.attach(name, start="next") as r:
        ready.set()
        for i in range(samples):
            _, m = r.receive_into(out, timeout=60)
            lat[i] = time.monotonic_ns() - m.timestamp_ns
    q.put(lat)


def bench_latency(samples: int) -> tuple[float, float]:
    name = f"mmfeed-bench-lat-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ready, go, done, rready, q = (FORK.Event(), FORK.Event(), FORK.Event(), FORK.Event(),
                                  FORK.Queue())
    w = FORK.Process(target=_latency_writer, args=(name, samples, ready, go, done))
    w.start()
    assert ready.wait(30)
    r = FORK.Process(target=_latency_reader, args=(name, samples, rready, q))
    r.start()
    assert rready.wait(30)
    go.set()
    lat = q.get(timeout=120) / 1e3
    done.set()
    r.join(30)
    w.join(30)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


# --- what a user would otherwise pick ----------------------------------------------------


def _queue_writer(q, size, count):
    src = np.full(size, 7, np.uint8)
    for _ in range(count):
        q.put(src)


def bench_queue(size: int, budget: float) -> tuple[float, float]:
    count = _count(size, budget / 2)
    q = FORK.Queue(maxsize=8)
    p = FORK.Process(target=_queue_writer, args=(q, size, count))
    p.start()
    q.get(timeout=60)
    t0 = time.perf_counter()
    for _ in range(count - 1):
        a = q.get(timeout=60)
    dt = time.perf_counter() - t0
    p.join(30)
    assert a.nbytes == size
    return (count - 1) * size / dt / 1e9, (count - 1) / dt


def _shm_writer(shm_name, size, count, lock, empty, full):
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(shm_name)
    dst = np.ndarray((size,), np.uint8, shm.buf)
    src = np.full(size, 7, np.uint8)
    for _ in range(count):
        empty.acquire()
        with lock:
            np.copyto(dst, src)
        full.release()
    del dst
    shm.close()


def bench_shared_memory_lock(size: int, budget: float) -> tuple[float, float]:
    from multiprocessing import shared_memory

    count = _count(size, budget)
    shm = shared_memory.SharedMemory(create=True, size=size)
    lock, empty, full = FORK.Lock(), FORK.Semaphore(1), FORK.Semaphore(0)
    p = FORK.Process(target=_shm_writer, args=(shm.name, size, count, lock, empty, full))
    p.start()
    src = np.ndarray((size,), np.uint8, shm.buf)
    out = np.empty(size, np.uint8)
    t0 = 0.0
    for i in range(count):
        full.acquire()
        if i == 1:
            t0 = time.perf_counter()
        with lock:
            np.copyto(out, src)
        empty.release()
    dt = time.perf_counter() - t0
    p.join(30)
    del src
    shm.close()
    shm.unlink()
    return (count - 1) * size / dt / 1e9, (count - 1) / dt


def _iox_service(node, iox2, service: str):
    return (node.service_builder(iox2.ServiceName.new(service))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False).subscriber_max_buffer_size(8).history_size(0)
            .open_or_create())


def _iox_reader(service, size, count, ready, q):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error) if hasattr(
        iox2, "set_log_level_from_env_or") else None
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    sub = _iox_service(node, iox2, service).subscriber_builder().create()
    ready.set()
    out = np.empty(size, np.uint8)
    got, t0 = 0, 0.0
    deadline = time.monotonic() + 120
    while got < count and time.monotonic() < deadline:
        s = sub.receive()
        if s is None:
            continue  # iceoryx2 pub/sub has no blocking receive: a user polls (or adds events)
        if got == 0:
            t0 = time.perf_counter()
        np.copyto(out, np.frombuffer(s.payload().as_memory_view(), np.uint8))
        s.delete()
        got += 1
    dt = time.perf_counter() - t0
    q.put(((got - 1) * size / dt / 1e9, (got - 1) / dt) if got == count else None)


def bench_iceoryx2(size: int, budget: float) -> tuple[float, float] | str:
    """(GB/s, samples/s), or why it could not run."""
    try:
        import iceoryx2 as iox2
    except ImportError as e:
        return f"not installed ({e})"
    try:
        if hasattr(iox2, "set_log_level_from_env_or"):
            iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        service = f"mmfeed-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        count = _count(size, budget)
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        pub = (_iox_service(node, iox2, service).publisher_builder().initial_max_slice_len(size)
               .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered).create())
        # spawn, not fork: iceoryx2 keeps per-process state that a fork must not inherit.
        ctx = mp.get_context("spawn")
        ready, q = ctx.Event(), ctx.Queue()
        p = ctx.Process(target=_iox_reader, args=(service, size, count, ready, q))
        p.start()
        if not ready.wait(60):
            return "reader did not start"
        src = np.full(size, 7, np.uint8)
        deadline = time.monotonic() + 30
        while True:  # a subscriber is seen only after the publisher updates its connections
            pub.update_connections()
            smp = pub.loan_slice_uninit(size)
            np.copyto(np.frombuffer(smp.payload().as_memory_view(), np.uint8), src)
            if smp.assume_init().send() > 0:
                break
            if time.monotonic() > deadline:
                return "subscriber never connected"
        for _ in range(count - 1):
            smp = pub.loan_slice_uninit(size)
            np.copyto(np.frombuffer(smp.payload().as_memory_view(), np.uint8), src)
            smp.assume_init().send()
        res = q.get(timeout=180)
        p.join(30)
        pub.delete()
        node.delete() if hasattr(node, "delete") else None
        return res if res is not None else "reader timed out"
    except Exception as e:  # report why, keep the rest of the table
        return f"failed: {type(e).__name__}: {e}"


# --- driver ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    budget = 0.12e9 if quick else 0.5e9
    load = os.getloadavg()
    print(f"# machine: {machine()}")
    print(f"# load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} cores{' (--quick)' if quick else ''}")
    rows = []
    limits = {}
    print(f"{'transport':<26}{'size':>8}{'readers':>8}{'GB/s/rdr':>10}{'samples/s':>11}"
          f"{'memcpy':>8}{'ratio':>7}{'cold':>7}{'ratio':>7}")

    def row(transport, size, n, res):
        lim, cold = limits[size]
        label = f"{size // KIB} KiB" if size < MIB else f"{size // MIB} MiB"
        if isinstance(res, str):
            print(f"{transport:<26}{label:>8}{n:>8}   {res}")
            rows.append(dict(transport=transport, size=size, readers=n, error=res))
            return
        gbps, sps = res
        print(f"{transport:<26}{label:>8}{n:>8}{gbps:>10.2f}{sps:>11.0f}{lim:>8.2f}"
              f"{gbps / lim:>7.2f}{cold:>7.2f}{gbps / cold:>7.2f}")
        rows.append(dict(transport=transport, size=size, readers=n, gbps=round(gbps, 3),
                         samples_per_s=round(sps, 1), memcpy_gbps=round(lim, 3),
                         ratio=round(gbps / lim, 3), memcpy_cold_gbps=round(cold, 3),
                         ratio_cold=round(gbps / cold, 3)))

    for size in SIZES:
        limits[size] = (memcpy_gbps(size, budget), memcpy_cold_gbps(size, budget))
        for n in READERS:
            runs = [bench_ring(size, n, budget) for _ in range(1 if quick else 3)]
            row("mmfeed ring (lossless)", size, n, sorted(runs)[len(runs) // 2])
        row("multiprocessing.Queue", size, 1, bench_queue(size, budget))
        row("shared_memory + Lock", size, 1, bench_shared_memory_lock(size, budget))
        row("iceoryx2 (poll)", size, 1, bench_iceoryx2(size, budget))
    p50, p99 = bench_latency(200 if quick else 1000)
    print(f"wake-up latency (publish -> blocked reader returns): p50 {p50:.0f} us, "
          f"p99 {p99:.0f} us")
    one = next(r for r in rows if r["transport"].startswith("mmfeed") and r["size"] == MIB
               and r["readers"] == 1)
    print("memcpy = np.copyto of the same bytes between two preallocated arrays (hot in cache); "
          "cold = the same from 8 rotating sources (an 8-slot ring's working set)")
    return report("ring", one["gbps"], "GB/s", "memcpy", one["memcpy_gbps"], want_json(argv),
                  size_bytes=MIB, readers=1, memcpy_cold_gbps=one["memcpy_cold_gbps"],
                  ratio_cold=one["ratio_cold"], latency_p50_us=round(p50, 1),
                  latency_p99_us=round(p99, 1), loadavg=[round(x, 2) for x in load],
                  table=rows)


if __name__ == "__main__":
    main()
