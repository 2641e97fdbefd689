"""Producer daemon throughput against the pipeline alone, and control-to-sample latency.

    python -m bench.producer [--quick] [--json] [--size WxH] [--media]

Figure: samples/s that `mm-producer run --rate max --loop` publishes into the ring while
replaying a synthetic dataset with video + audio + lidar + radar (+ an unknown sensor), counted
from the ring header over a fixed window. Limit: `Pipeline(config).process` alone, in this
process, on the same samples in the same order - what the daemon would reach if the ring,
the control socket, heartbeats and the loop cost nothing. It is measured before and after the
daemon run and averaged, so load drift on a shared machine hits both sides alike.

In place against copies (issue 20): the daemon is run twice in the same bench run, making
samples in place in ring slots (the default, producer/slot_fill.py) and with every sample
published by copy ($MMFEED_PRODUCER_COPY=1, the path before); the table prints both rates
and the bytes each copied per sample (status `copies`). `--size` sets the video frame: the
copy saved grows with it (8 frames of 64x48 RGB are 72 KiB, of 640x480 7 MiB). `--media`:
the source is one H.264 file (30 s at 10 fps, --loop) instead of the dataset: the live clip
path (clip thread, media_clips.ClipFrames written into the slot); its limit is demux + decode
+ conversion alone (`MediaSource.clips`, each clip made into an array), in this process.

Second figure (in the JSON as `filter_latency_ms_p50`): seconds from sending `filter` through
a `ControlClient` (what `mmctl filter` does) to the first sample of the new generation read
from the ring by a reader in this process, median over several gray/rgb switches.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench._common import report
from producer.dataset import index_dataset
from producer.pipeline import Pipeline, PipelineConfig
from producer.slot_fill import FORCE_COPY_ENV
from producer.sources import DatasetReplay
from producer.synth import make_dataset
from protocol.control import ControlClient, Timeouts
from protocol.ring import RingReader

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 8


def pipeline_rate(root: Path, seconds: float) -> float:
    """Samples/s of the pipeline alone, in replay order, looping, for about `seconds`."""
    replay = DatasetReplay(root, loop=True)
    pipe = Pipeline(PipelineConfig(clip_frames=CLIP_FRAMES))
    for _ in range(3):  # warm-up: imports, FFT plans, page cache
        pipe.process(replay.next().sample)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pipe.process(replay.next().sample)
        n += 1
    return n / (time.perf_counter() - t0)


def media_rate(path: Path, seconds: float) -> float:
    """Clips/s of demux + decode + conversion alone (each clip written into an array)."""
    import numpy as np

    from producer.sources import MediaSource
    from protocol.filters import FilterSpec

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for clip in MediaSource(str(path)).clips(FilterSpec(), CLIP_FRAMES):
            np.asarray(clip.video)
            n += 1
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def start_daemon(root: Path, ring: str, runtime: str, copy: bool = False) -> subprocess.Popen:
    env = {**os.environ, "MMFEED_RUNTIME_DIR": runtime}
    env.pop("NOTIFY_SOCKET", None)
    env.pop(FORCE_COPY_ENV, None)
    if copy:
        env[FORCE_COPY_ENV] = "1"  # every sample published by copy (producer/slot_fill.py)
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "run", "--source", str(root), "--ring", ring,
         "--loop", "--rate", "max", "--clip-frames", str(CLIP_FRAMES), "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if line and json.loads(line).get("event") == "ready":
                return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("mm-producer run did not become ready")


def daemon_rate(ring: str, seconds: float) -> float:
    """Samples/s published, read from the ring header (no reader competing for the CPU)."""
    with RingReader.attach(ring, register=False) as r:
        deadline = time.monotonic() + 60
        while r.ring_stats().published < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # warm-up: first samples out
        n0, t0 = r.ring_stats().published, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.1)   # sampling interval of a counter, not a wait for an event
        n1, t1 = r.ring_stats().published, time.perf_counter()
    return (n1 - n0) / (t1 - t0)


def filter_latencies(ring: str, endpoint: str, switches: int) -> list[float]:
    client = ControlClient(endpoint, Timeouts(request=30.0, retries=0))
    out = []
    with RingReader.attach(ring, start="next") as reader:
        for i in range(switches):
            spec = "gray" if i % 2 == 0 else "rgb"
            t0 = time.perf_counter()
            gen = client.request("filter", spec=spec)["generation"]
            while True:
                s = reader.receive(timeout=30)
                if s is None:
                    raise RuntimeError(f"no sample of generation {gen} within 30 s")
                if s.meta.generation >= gen:
                    out.append(time.perf_counter() - t0)
                    break
    client.close()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.producer",
        description="mm-producer run throughput vs the pipeline alone, and filter-to-sample "
                    "latency.")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--quick", action="store_true",
                        help="4 s windows and 4 filter switches instead of 10 s and 8")
    parser.add_argument("--size", default="64x48",
                        help="video frame WxH of the synthetic dataset (even numbers)")
    parser.add_argument("--media", action="store_true",
                        help="a media file as the source (the live clip path)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    # The limit runs the pipeline as `mm-producer run` does: numpy's BLAS at one thread
    # (producer/run.py); otherwise the limit pays BLAS spin-waits the daemon does not.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    as_json = args.json
    quick = args.quick
    window = 4.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="mmbench") as tmp:
        root = Path(tmp) / "ds"
        w, h = (int(x) for x in args.size.lower().split("x"))
        if args.media:
            import numpy as np

            from producer.synth import make_sample

            root = make_sample(Path(tmp) / "media", 0, np.random.default_rng(0), index=1,
                               size=(w, h), clip_seconds=30.0, extras=False) / "video.mp4"
            n_samples = 0
            alone = lambda: media_rate(root, window)  # noqa: E731
        else:
            make_dataset(root, per_class={"train": 2 if quick else 4}, size=(w, h),
                         clip_seconds=1.0)
            n_samples = len(index_dataset(root).samples)
            alone = lambda: pipeline_rate(root, window)  # noqa: E731
        before = alone()
        rates, copies = {}, {}
        for path in ("in place", "copy"):
            runtime = tempfile.mkdtemp(prefix="mmb", dir="/tmp")
            ring = f"bench-producer-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            proc = start_daemon(root, ring, runtime, copy=path == "copy")
            endpoint = f"ipc://{runtime}/producer.sock"
            try:
                rates[path] = daemon_rate(ring, window)
                client = ControlClient(endpoint, Timeouts(request=30.0, retries=0))
                copies[path] = client.request("status")["copies"]
                client.close()
                if path == "in place":
                    lat = filter_latencies(ring, endpoint, 4 if quick else 8)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        after = alone()
    limit = (before + after) / 2
    limit_name = "decode alone" if args.media else "pipeline alone"
    daemon = rates["in place"]
    if not as_json:
        for path in rates:
            print(f"daemon {path:<9} {rates[path]:8.1f} samples/s  "
                  f"{rates[path] / limit:5.2f} x the {limit_name}; copied per sample: "
                  f"{copies[path]['copy_bytes_mean']:.0f} bytes (mean), "
                  f"{copies[path]['in_place_samples']} in place, "
                  f"{copies[path]['copied_samples']} copied")
    report("producer", daemon, "samples/s", limit_name, limit, as_json,
           pipeline_before=round(before, 3), pipeline_after=round(after, 3),
           samples=n_samples, clip_frames=CLIP_FRAMES, frame=f"{w}x{h}",
           source="media file" if args.media else "dataset",
           copy_path_samples_per_s=round(rates["copy"], 3),
           in_place_vs_copy=round(rates["in place"] / rates["copy"], 3),
           copy_bytes_per_sample_in_place=copies["in place"]["copy_bytes_mean"],
           copy_bytes_per_sample_copy=copies["copy"]["copy_bytes_mean"],
           filter_latency_ms_p50=round(statistics.median(lat) * 1e3, 1),
           filter_latency_ms=[round(x * 1e3, 1) for x in lat])
    if not as_json:
        print(f"filter -> first sample of the new generation: p50 "
              f"{statistics.median(lat) * 1e3:.1f} ms over {len(lat)} switches "
              f"(min {min(lat) * 1e3:.1f}, max {max(lat) * 1e3:.1f})")


if __name__ == "__main__":
    main()
