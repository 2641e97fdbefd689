"""Video stores in the disk cache: bytes, loader speed and stall, raw vs h264 vs hevc vs nv12.

    python -m bench.video_store [--quick] [--json] [--batch-size 8] [--steps 60]
    python -m bench.video_store --sweep [--json]     # the settings table behind DEFAULT_SETTINGS

What it measures, each store against the raw store in the same run:

1. The demo dataset (producer.synth at the demo's size: 16 train + 6 val per class, every
   modality) preprocessed once per store through `run_preprocess` (the code `mm-producer
   preprocess --video-store S` runs): the clip's bytes per sample as stored, the record's bytes
   per sample (lidar, audio, radar ride along raw), the cache's size on disk (allocated blocks
   of the version's files).
2. 1080p clips: 8-frame clips of real footage scaled to 1920x1080 (intel_car-detection.mp4 when
   present, else the synthetic generator's frames at 1080p), one record each per store: bytes a
   clip and PSNR against raw.
3. Loader samples/s: `DiskLoader` over each cache (warm page cache, shuffled batches, decoding
   with the reader's threads). The limit is the raw store's read of the same records.
4. Stall: the demo model (default late fusion) trained by the real `Trainer` on each demo cache
   for --steps steps on the CPU: `stall_fraction` = time waiting for data / step time. At 1080p a
   fixed compute step of --compute-ms (bench.stall's calibrated matmul) fed from each store.

The JSON figure is the h264 demo cache's loader samples/s, the limit the raw cache's; the goal
of issue 17 is `h264_video_ratio` >= 10 (the clip at least 10x smaller) with `stall.h264` < 0.02.
"""
from __future__ import annotations

import argparse
import glob
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import report
from producer.synth import REAL_DIR

STORES = ("raw", "h264", "hevc", "nv12")
CAR = REAL_DIR / "intel_car-detection.mp4"  # $MMFEED_REAL_DATA (producer/synth.py)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def disk_bytes(cache: Path) -> int:
    """Bytes the committed version takes on disk (allocated blocks, padding included)."""
    from protocol.cache import read_current, version_name

    vdir = cache / version_name(read_current(cache))
    return sum(p.stat().st_blocks * 512 for p in vdir.iterdir() if p.is_file())


def video_bytes(reader) -> float:
    """Mean bytes of the clip as stored (record bytes minus the other modalities)."""
    from protocol.video_store import VIDEO

    out = []
    for i in range(len(reader)):
        schema = reader.schema(i)
        if VIDEO not in schema:
            continue
        rest = schema.payload_nbytes - schema.spec(VIDEO).nbytes
        out.append(reader.stored_nbytes(i) - rest)
    return float(np.mean(out)) if out else 0.0


def loader_rate(cache: Path, batch: int, seconds: float) -> float:
    """Samples/s of DiskLoader over the train split (warm: one pass first)."""
    from protocol.cache import CacheReader
    from trainer.prefetch import DiskLoader

    reader = CacheReader(cache, "train")

    def run(limit_s: float | None, epochs: int | None) -> tuple[int, float]:
        loader = DiskLoader(reader, batch, epochs=epochs, pin=False).start()
        n, t0 = 0, time.perf_counter()
        try:
            while limit_s is None or time.perf_counter() - t0 < limit_s:
                b = loader.get(10.0)
                if b is None:
                    break
                n += b.n
                b.release()
        finally:
            loader.close()
        return n, time.perf_counter() - t0

    run(None, 1)  # warm the page cache and the decoders
    n, dt = run(seconds, None)
    reader.close()
    return n / dt


def demo_stall(cache: Path, batch: int, steps: int, workdir: Path) -> dict:
    from trainer.loop import Trainer, TrainConfig

    tr = Trainer(TrainConfig(cache=cache, batch_size=batch, steps=steps, seed=0,
                             checkpoint_dir=workdir / f"ck-{cache.name}", log_interval=1e9))
    try:
        for _ in range(5):  # warm-up steps, not counted
            tr.step_once(timeout=60.0)
        tr.total_wait_s = tr.total_step_s = 0.0
        while tr.step < steps + 5:
            assert tr.step_once(timeout=60.0)
        return {"stall": tr.stall_fraction(),
                "step_ms": round(1000 * tr.total_step_s / steps, 2)}
    finally:
        tr.close()


def clips_1080p(n: int) -> list[np.ndarray]:
    from producer.modalities import video
    from protocol.filters import FilterSpec

    if CAR.exists():
        spec = FilterSpec.parse("resize=1920x1080")
        return [video.decode_clip(CAR, spec, 8, segment=(1.0 + 1.7 * k, 4.0 + 1.7 * k))
                for k in range(n)]
    from producer.synth import _frames

    rng = np.random.default_rng(0)
    return [np.ascontiguousarray(_frames(k % 3, rng, (1920, 1080), 8).transpose(0, 3, 1, 2))
            for k in range(n)]


def build_1080p(root: Path, clips: list[np.ndarray]) -> dict[str, dict]:
    from producer.cache_writer import CacheWriter
    from protocol.cache import CacheReader
    from protocol.schema import SampleMeta, SampleSchema
    from protocol.video_store import StoreSettings, encode_record

    out = {}
    for store in STORES:
        cache = root / f"hd-{store}"
        settings = StoreSettings.for_store(store)
        t0 = time.perf_counter()
        with CacheWriter(cache, classes=["a", "b"], store_settings=settings.to_dict()) as w:
            for k, clip in enumerate(clips):
                arrays = {"video": clip}
                schema, record = encode_record(SampleSchema.from_arrays(arrays), arrays, settings)
                w.add(f"train/a/{k}", "fp", "train", schema, SampleMeta(label=k % 2),
                      payload=record)
            w.commit()
        encode_s = time.perf_counter() - t0
        r = CacheReader(cache)
        quality = []
        for k in range(len(clips)):
            s = r.view(k)
            v = s.arrays["video"]
            if s.schema.packed:
                from protocol.video_store import nv12_to_rgb_swscale

                v = nv12_to_rgb_swscale(v, *clips[k].shape[-2:], "bt601", "limited")
            quality.append(psnr(clips[k], v))
        out[store] = {"cache": cache, "clip_bytes": float(np.mean([r.stored_nbytes(k)
                                                                  for k in range(len(r))])),
                      "disk_bytes": disk_bytes(cache), "psnr": float(np.mean(quality)),
                      "encode_s_per_clip": encode_s / len(clips)}
        r.close()
    return out


def fixed_step_stall(cache: Path, batch: int, steps: int, compute_ms: float) -> float:
    """Stall of a calibrated fixed compute step (bench.stall's) fed from `cache`."""
    import torch

    from bench.stall import _calibrate, _compute
    from protocol.cache import CacheReader
    from trainer.prefetch import DevicePrefetcher, DiskLoader

    a, iters = _calibrate(compute_ms)
    reader = CacheReader(cache, "train")
    loader = DiskLoader(reader, batch, pin=False).start()
    pf = DevicePrefetcher(loader.get, torch.device("cpu"))
    wait = total = 0.0
    try:
        for s in range(steps + 3):
            t0 = time.perf_counter()
            b = None
            while b is None:
                b = pf.get(10.0)
            t1 = time.perf_counter()
            x = b.inputs["video"].float()
            b.release()
            del x
            _compute(a, iters)
            if s >= 3:
                wait += t1 - t0
                total += time.perf_counter() - t0
    finally:
        pf.close()
        loader.close()
        reader.close()
    return wait / total


def sweep(as_json: bool) -> dict:
    """bytes / PSNR / decode ms per (store, crf, preset): how DEFAULT_SETTINGS were chosen."""
    from producer.modalities import video
    from producer.synth import make_dataset
    from protocol.filters import FilterSpec
    from protocol.video_store import StoreSettings, decode_video_into, encode_video

    work = Path(tempfile.mkdtemp(prefix="mmfeed-bench-vsweep-"))
    try:
        make_dataset(work / "ds", per_class={"train": 4}, seed=0, extras=False)
        sets = {"demo 64x48": [video.decode_clip(f, FilterSpec(), 8)
                               for f in sorted(glob.glob(str(work / "ds/*/*/*/video.mp4")))]}
        if CAR.exists():
            spec = FilterSpec.parse("resize=224x224")
            sets["real 224x224"] = [video.decode_clip(CAR, spec, 8, segment=(s, s + 3))
                                    for s in (0.0, 3.0, 6.0)]
        rows = []
        for name, clips in sets.items():
            raw = clips[0].nbytes
            for store, crfs in (("h264", (18, 20, 23, 26)), ("hevc", (20, 22, 25, 28))):
                for crf in crfs:
                    for preset in ("veryfast", "medium"):
                        st = StoreSettings.for_store(store, crf=crf, preset=preset)
                        size, q, dec = [], [], []
                        for c in clips:
                            blob = encode_video(c, st)
                            o = np.empty_like(c)
                            t0 = time.perf_counter()
                            decode_video_into(blob, o)
                            dec.append(time.perf_counter() - t0)
                            size.append(len(blob))
                            q.append(psnr(c, o))
                        row = {"clips": name, "store": store, "crf": crf, "preset": preset,
                               "bytes": round(float(np.mean(size))),
                               "ratio": round(raw / float(np.mean(size)), 1),
                               "psnr": round(float(np.mean(q)), 2),
                               "psnr_min": round(float(np.min(q)), 2),
                               "decode_ms": round(1000 * float(np.median(dec)), 3)}
                        rows.append(row)
                        print(f"{name:13s} {store} crf {crf:2d} {preset:8s} {row['bytes']:7d} B "
                              f"({row['ratio']:6.1f}x)  PSNR {row['psnr']:5.2f} (min "
                              f"{row['psnr_min']:5.2f}) dB  decode {row['decode_ms']:.2f} ms")
        if as_json:
            import json

            print(json.dumps({"bench": "video_store_sweep", "rows": rows}))
        return {"rows": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller dataset, fewer steps")
    ap.add_argument("--sweep", action="store_true", help="only the settings sweep")
    ap.add_argument("--batch-size", type=int, default=8, help="the demo trainer's (8)")
    ap.add_argument("--steps", type=int, default=None, help="trainer steps per store")
    ap.add_argument("--compute-ms", type=float, default=100.0,
                    help="the fixed step fed by the 1080p caches")
    ap.add_argument("--dir", default=None, help="where to write the caches (a real disk)")
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep(args.json)
    from producer.pipeline import PipelineConfig
    from producer.preprocess import run_preprocess
    from producer.synth import make_dataset
    from protocol.cache import CacheReader

    steps = args.steps or (20 if args.quick else 60)
    per_class = {"train": 6, "val": 3} if args.quick else {"train": 16, "val": 6}
    work = Path(tempfile.mkdtemp(prefix="mmfeed-bench-vstore-", dir=args.dir))
    try:
        data = make_dataset(work / "ds", per_class=per_class, seed=0)
        demo: dict[str, dict] = {}
        for store in STORES:
            cache = work / f"demo-{store}"
            summary = run_preprocess(data, cache, PipelineConfig(video_store=store), workers=2,
                                     progress=False)
            r = CacheReader(cache)
            demo[store] = {"records": len(r), "stores": r.store_counts(),
                           "video_bytes": video_bytes(r),
                           "record_bytes": float(np.mean([r.stored_nbytes(i)
                                                          for i in range(len(r))])),
                           "disk_bytes": disk_bytes(cache),
                           "preprocess_s": summary["seconds"]}
            r.close()
            demo[store]["loader_per_s"] = loader_rate(cache, args.batch_size,
                                                      2.0 if args.quick else 5.0)
            demo[store].update(demo_stall(cache, args.batch_size, steps, work))
        hd_clips = clips_1080p(3 if args.quick else 8)
        hd = build_1080p(work, hd_clips)
        for store, row in hd.items():
            row["loader_per_s"] = loader_rate(row["cache"], 2, 2.0 if args.quick else 5.0)
            row["stall"] = fixed_step_stall(row["cache"], 2, 10 if args.quick else 30,
                                            args.compute_ms)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    raw = demo["raw"]
    print(f"demo dataset ({raw['records']} samples, batch {args.batch_size}, {steps} steps of the "
          f"demo model on the CPU):")
    print(f"  {'store':5s} {'video B':>9s} {'x raw':>7s} {'record B':>9s} {'cache MiB':>9s} "
          f"{'loader/s':>9s} {'x raw':>6s} {'stall':>7s} {'step ms':>8s}")
    for store, row in demo.items():
        print(f"  {store:5s} {row['video_bytes']:9.0f} {raw['video_bytes'] / row['video_bytes']:7.1f} "
              f"{row['record_bytes']:9.0f} {row['disk_bytes'] / 2**20:9.2f} "
              f"{row['loader_per_s']:9.1f} {row['loader_per_s'] / raw['loader_per_s']:6.2f} "
              f"{100 * row['stall']:6.2f}% {row['step_ms']:8.1f}")
    hraw = hd["raw"]
    print(f"1080p clips ({len(hd_clips)} x 8 frames, {'real footage' if CAR.exists() else 'synthetic'};"
          f" fixed {args.compute_ms:g} ms step, batch 2):")
    print(f"  {'store':5s} {'clip B':>10s} {'x raw':>7s} {'PSNR dB':>8s} {'loader/s':>9s} "
          f"{'x raw':>6s} {'stall':>7s} {'encode s':>9s}")
    for store, row in hd.items():
        print(f"  {store:5s} {row['clip_bytes']:10.0f} {hraw['clip_bytes'] / row['clip_bytes']:7.1f} "
              f"{row['psnr']:8.2f} {row['loader_per_s']:9.2f} "
              f"{row['loader_per_s'] / hraw['loader_per_s']:6.2f} {100 * row['stall']:6.2f}% "
              f"{row['encode_s_per_clip']:9.2f}")
    h264 = demo["h264"]
    goal = (raw["video_bytes"] / h264["video_bytes"] >= 10.0 and h264["stall"] < 0.02)
    print(f"goal (h264 clip >= 10x smaller, stall < 2%): {'met' if goal else 'NOT met'}")
    return report(
        "video_store", h264["loader_per_s"], "samples/s", "raw store DiskLoader samples/s",
        raw["loader_per_s"], args.json,
        h264_video_ratio=round(raw["video_bytes"] / h264["video_bytes"], 2),
        h264_record_ratio=round(raw["record_bytes"] / h264["record_bytes"], 3),
        stall={k: round(v["stall"], 4) for k, v in demo.items()},
        demo={k: {kk: (round(vv, 3) if isinstance(vv, float) else vv)
                  for kk, vv in v.items()} for k, v in demo.items()},
        hd={k: {kk: round(vv, 3) for kk, vv in v.items() if kk != "cache"}
            for k, v in hd.items()},
        goal_met=goal, batch_size=args.batch_size, steps=steps, quick=args.quick)


if __name__ == "__main__":
    main()
    sys.exit(0)
