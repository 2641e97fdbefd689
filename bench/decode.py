"""Video decode: mmfeed's video path vs the ffmpeg command line vs torchcodec, same files, same run.

    python -m bench.decode [--json] [--seconds S] [--repeats N] [--profile]

Makes H.264 clips with PyAV (480p and 1080p, cached in a temp dir), then measures frames/s:
  mmfeed      video.decode_clip at source size (RGB, planar uint8 (T, 3, H, W)) and to 224x224,
              and video.iter_frames at source size
  ffmpeg      `ffmpeg -threads N -i f -f null -` (decode only, no colour conversion: the ceiling),
              and with `-vf format=gbrp` (the same work mmfeed does) for reference
  torchcodec  VideoDecoder(device="cpu").get_frames_in_range (RGB, (T, 3, H, W))
The figure is mmfeed 1080p source-size frames/s, the limit the ffmpeg CLI's on the same file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from bench._common import cuda_variant, repeat, report, want_json
from producer.modalities import video
from protocol.filters import FilterSpec

SIZES = {"480p": (854, 480), "1080p": (1920, 1080)}
RATE = 30
CACHE = Path(tempfile.gettempdir()) / "mmfeed-bench-decode"


#: encoder -> its options: 2 B-frames each, so both decoders reorder frames as real footage needs
ENCODERS = {"libx264": {"preset": "veryfast", "crf": "23", "bf": "2"},
            "libx265": {"preset": "ultrafast", "crf": "28",
                        "x265-params": "bframes=2:log-level=error"}}


def make_clip(name: str, size: tuple[int, int], seconds: float, codec: str = "libx264") -> Path:
    """A moving gradient with texture: real motion for the encoder, cheap to generate.
    `codec` is "libx264" (H.264) or "libx265" (HEVC)."""
    w, h = size
    suffix = "" if codec == "libx264" else f"_{codec}"
    path = CACHE / f"{name}_{seconds:g}s{suffix}.mp4"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = np.random.default_rng(0).integers(0, 24, (h, w), dtype=np.uint8)
    with av.open(str(tmp), "w") as out:
        s = out.add_stream(codec, rate=RATE)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = dict(ENCODERS[codec])
        for i in range(int(seconds * RATE)):
            img = np.empty((h, w, 3), np.uint8)
            img[..., 0] = ((xx + 6 * i) % 256).astype(np.uint8) // 2 + texture
            img[..., 1] = ((yy + 3 * i) % 256).astype(np.uint8) // 2 + texture
            img[..., 2] = (128 + 100 * np.sin((xx + yy + 10 * i) / 60)).astype(np.uint8) // 2
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    tmp.rename(path)
    return path


def count_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.demux(video=0) if _.size)


def ffmpeg_cmd(path: Path, threads: int, extra: list[str]) -> list[str] | None:
    exe = shutil.which("ffmpeg")
    if exe is None:
        return None
    return [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", str(threads),
            "-i", str(path), *extra, "-f", "null", "-"]


def torchcodec_decode(path: Path, n: int):
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(str(path), device="cpu", seek_mode="approximate")
    return dec.get_frames_in_range(0, n).data


def torchcodec_status(path: Path, n: int) -> str | None:
    """None when torchcodec decodes here, else why not (one line)."""
    try:
        out = torchcodec_decode(path, min(n, 4))
        assert tuple(out.shape[1:]) == (3, *reversed(SIZES["480p"])) or out.shape[0] > 0
        return None
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def fps(n: int, timing) -> tuple[float, float, float]:
    lo, hi = timing.spread
    return n / timing.median, n / hi, n / lo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def decode_cuda(rest):  # --device cuda: NVDEC vs ffmpeg -hwaccel cuda (bench/decode_cuda.py)
        from bench.decode_cuda import main

        return main(rest)

    handled, result = cuda_variant(argv, "python -m bench.decode", decode_cuda)
    if handled:
        return result
    ap = argparse.ArgumentParser(prog="python -m bench.decode")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length (default 4 s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="pyinstrument the 1080p decode loop")
    args = ap.parse_args(argv)
    threads = os.cpu_count() or 1
    rgb, small = FilterSpec(), FilterSpec.parse("resize=224x224")
    results: dict[str, dict] = {}
    tc_why = None
    for name, size in SIZES.items():
        path = make_clip(name, size, args.seconds)
        n = count_frames(path)
        row: dict[str, object] = {"frames": n}
        t = repeat(lambda: video.decode_clip(path, rgb, n), args.repeats)
        row["mmfeed_clip"] = fps(n, t)
        t = repeat(lambda: sum(1 for _ in video.iter_frames(path, rgb)), args.repeats)
        row["mmfeed_iter"] = fps(n, t)
        t = repeat(lambda: video.decode_clip(path, small, n), args.repeats)
        row["mmfeed_224"] = fps(n, t)
        for key, extra in (("ffmpeg", []), ("ffmpeg_gbrp", ["-vf", "format=gbrp"])):
            cmd = ffmpeg_cmd(path, threads, extra)
            if cmd is not None:
                t = repeat(lambda: subprocess.run(cmd, check=True), args.repeats)
                row[key] = fps(n, t)
        tc_why = torchcodec_status(path, n)
        if tc_why is None:
            t = repeat(lambda: torchcodec_decode(path, n), args.repeats)
            row["torchcodec"] = fps(n, t)
        results[name] = row
    print(f"decode: H.264 {args.seconds:g} s clips at {RATE} fps, {threads} threads; frames/s "
          "median (min..max over repeats)")
    cols = ["mmfeed_clip", "mmfeed_iter", "mmfeed_224", "ffmpeg", "ffmpeg_gbrp", "torchcodec"]
    print(f"{'':6}" + "".join(f"{c:>22}" for c in cols))
    for name, row in results.items():
        cells = [f"{row[c][0]:8.1f} ({row[c][1]:.0f}..{row[c][2]:.0f})" if c in row else "n/a"
                 for c in cols]
        print(f"{name:6}" + "".join(f"{c:>22}" for c in cells))
    if shutil.which("ffmpeg") is None:
        print("ffmpeg CLI not found: install it (apt-get install ffmpeg) for the limit column")
    if tc_why is not None:
        print(f"torchcodec CPU decoder unavailable: {tc_why}")
    if args.profile:
        from pyinstrument import Profiler

        path = make_clip("1080p", SIZES["1080p"], args.seconds)
        prof = Profiler(interval=0.001)
        prof.start()
        video.decode_clip(path, rgb, count_frames(path))
        prof.stop()
        print(prof.output_text(unicode=False, color=False, show_all=False))
    big = results["1080p"]
    if "ffmpeg" not in big:
        print("decode: no ffmpeg CLI, no limit to judge against", file=sys.stderr)
        return 1
    extra = {name: {k: (round(v[0], 1) if isinstance(v, tuple) else v) for k, v in row.items()}
             for name, row in results.items()}
    report("decode", big["mmfeed_clip"][0], "frames/s", "ffmpeg CLI -f null (1080p)",
           big["ffmpeg"][0], args.json, threads=threads, results=extra, torchcodec=tc_why or "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
