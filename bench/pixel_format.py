"""`pixel_format=yuv420` against rgb, in one run: decode, bytes through ring and cache, trainer.

    python -m bench.pixel_format [--quick] [--json] [--seconds S] [--repeats N]

Same H.264 clips as bench.decode (made by PyAV, cached in a temp dir), the same run:
- decode frames/s at 1080p source size: `video.decode_clip` with pixel_format=rgb (swscale
  yuv420p -> planar RGB, exact rounding) and yuv420 (the decoder's planes copied out as NV12,
  no colour conversion), beside the ffmpeg command line `ffmpeg -threads N -i F -f null -`
  (decode only: the limit; bench.decode's reference). Figure: yuv420 frames/s; limit: the CLI.
- bytes per sample: a ring slot's payload (`SampleSchema.payload_nbytes`) and a cache record
  (`CacheReader.stored_nbytes`) of the same 8-frame clip in each format (480p source size).
- trainer stall: bench.stall's loop (DiskLoader -> DevicePrefetcher -> the model's uint8 ->
  float copy, then a fixed ~`--compute-ms` matmul compute) over a cache of each format; yuv420
  batches are converted to RGB on the trainer's device after the copy (trainer/layouts.py), so
  its cost is in the figure. On a CPU-only machine "device" is the CPU: the conversion then
  runs in the loader thread and competes with the compute for the cores.
Idle figures: `python -m bench.pixel_format --json` on an idle machine (~2 min on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench._common import machine, repeat, report
from bench.decode import count_frames, ffmpeg_cmd, fps, make_clip
from producer.modalities import video
from protocol.filters import FilterSpec
from protocol.schema import SampleMeta, SampleSchema

FORMATS = ("rgb", "yuv420")


def _cache(root: Path, path: Path, fmt: str, n: int) -> Path:
    """n records of 8-frame clips of `path` in `fmt` (different starts, so different bytes)."""
    from producer.cache_writer import CacheWriter

    spec = FilterSpec(pixel_format=fmt)
    cache = root / f"cache-{fmt}"
    with CacheWriter(cache, classes=["a", "b"]) as w:
        for i in range(n):
            clip = video.decode_clip(path, spec, 8, (0.1 * (i % 8), 100.0))
            arrays = {"video": clip, "vec": np.full(64, i, np.float32)}
            w.add(f"train/{i}", "fp", "train", SampleSchema.from_arrays(arrays),
                  SampleMeta(label=i % 2, index=i), arrays)
        w.commit()
    return cache


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.pixel_format",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter clips, fewer steps")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=None, help="1080p clip length (4 s)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--compute-ms", type=float, default=20.0)
    args = ap.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    repeats = args.repeats or (2 if args.quick else 3)
    threads = os.cpu_count() or 1
    print(f"# pixel_format: H.264 1080p {seconds:g} s, {threads} threads; load average "
          f"{os.getloadavg()[0]:.2f}; {machine()}", file=sys.stderr)

    big = make_clip("1080p", (1920, 1080), seconds)
    n = count_frames(big)
    decode: dict[str, float] = {}
    for fmt in FORMATS:
        spec = FilterSpec(pixel_format=fmt)
        decode[fmt] = fps(n, repeat(lambda: video.decode_clip(big, spec, n), repeats))[0]
    cmd = ffmpeg_cmd(big, threads, [])
    if cmd is None:
        print("pixel_format: no ffmpeg CLI (apt-get install ffmpeg): no limit to judge against",
              file=sys.stderr)
        return {}
    decode["ffmpeg"] = fps(n, repeat(lambda: subprocess.run(cmd, check=True), repeats))[0]
    for k, v in decode.items():
        print(f"  decode 1080p {k:7s} {v:8.1f} frames/s | ratio to ffmpeg CLI "
              f"{v / decode['ffmpeg']:.2f}", file=sys.stderr)

    from bench.stall import _calibrate, _run
    from protocol.cache import CacheReader

    tmp = Path(tempfile.mkdtemp(prefix="bench-pixel-format-"))
    rows: dict[str, dict] = {}
    try:
        small = make_clip("480p", (854, 480), 2.0)
        a, iters = _calibrate(args.compute_ms)
        records = 16 if args.quick else 48
        for fmt in FORMATS:
            cache = _cache(tmp, small, fmt, records)
            with CacheReader(cache, "train") as r:
                ring_bytes = r.schema(0).payload_nbytes
                cache_bytes = r.stored_nbytes(0)
                video_bytes = r.schema(0).spec("video").nbytes
            st = _run(20 if args.quick else 100, 4, a, iters, cache, None, 0.0)
            rows[fmt] = {"decode_1080p_fps": round(decode[fmt], 1),
                         "ring_bytes_per_sample": ring_bytes,
                         "cache_bytes_per_sample": cache_bytes,
                         "video_bytes_per_sample": video_bytes,
                         "trainer_stall": round(st["stall"], 4),
                         "trainer_steps_per_s": round(st["steps_per_s"], 2)}
            print(f"  {fmt:7s} ring {ring_bytes:9d} B/sample | cache {cache_bytes:9d} B/sample "
                  f"| trainer stall {st['stall']:.3f} at {st['steps_per_s']:.1f} steps/s "
                  f"(480p 8-frame clips, batch 4, ~{args.compute_ms:g} ms compute)",
                  file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = rows["yuv420"]["ring_bytes_per_sample"] / rows["rgb"]["ring_bytes_per_sample"]
    print(f"  yuv420/rgb bytes per sample: ring {ratio:.3f}, cache "
          f"{rows['yuv420']['cache_bytes_per_sample'] / rows['rgb']['cache_bytes_per_sample']:.3f}"
          f"; decode {decode['yuv420'] / decode['rgb']:.2f}x rgb", file=sys.stderr)
    return report("pixel_format", decode["yuv420"], "frames/s",
                  "ffmpeg CLI -f null (1080p)", decode["ffmpeg"], args.json, threads=threads,
                  formats=rows, ffmpeg_fps=round(decode["ffmpeg"], 1),
                  load_avg=[round(x, 2) for x in os.getloadavg()])


if __name__ == "__main__":
    main()
