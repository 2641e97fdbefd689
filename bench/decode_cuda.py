"""NVDEC decode: mmfeed's GPU video path vs `ffmpeg -hwaccel cuda` vs torchcodec CUDA, same files.

    python -m bench.decode --device cuda [--json] [--seconds S] [--repeats N]

Same H.264 clips as bench/decode.py (PyAV-made 480p and 1080p), plus a 1080p HEVC clip of the
same pictures (libx265; NVDEC decodes both). Frames/s of:
  mmfeed      video.decode_clip(..., device="cuda"): NVDEC via PyAV hwaccel, DLPack planes,
              NV12 -> RGB in torch, (T, 3, H, W) uint8 on the GPU (synchronised before timing ends)
  ffmpeg      `ffmpeg -hwaccel cuda -hwaccel_output_format cuda -i f -f null -`: NVDEC with
              frames left on the GPU, no conversion - the ceiling
  torchcodec  VideoDecoder(device="cuda").get_frames_in_range (RGB on the GPU), for reference
Filter rows (issue 15, bench/_ffmpeg_rows.py), at 1080p and 4K H.264, spec resize=224x224:
  child_cuda_224 (the supervised ffmpeg child: NVDEC + scale_cuda, frames read from the pipe)
  vs ffmpeg_scale_cuda_224 (`ffmpeg -hwaccel cuda ... -vf scale_cuda=224:224 -f null -`)
  vs torch_224 (decode_clip device="cuda": NVDEC + the torch kernels).
The figure is mmfeed 1080p H.264 frames/s, the limit the ffmpeg CLI's on the same file; the
HEVC ratio is printed beside it and in the JSON (`hevc_ratio`). Target: both ratios >= 0.9.
Without a GPU: one line saying why, exit 2 (bench/_cuda.py).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from bench import _ffmpeg_rows as ffmpeg_rows
from bench._common import repeat, report
from bench._cuda import cuda_missing, skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode --device cuda")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    why = cuda_missing()
    if why is not None:
        return skip("decode_cuda", why, args.json)
    import torch

    from bench.decode import SIZES, count_frames, fps, make_clip
    from producer.modalities import video
    from protocol.filters import FilterSpec

    rgb = FilterSpec()

    def mmfeed(path, n):
        out = video.decode_clip(path, rgb, n, device="cuda")
        torch.cuda.synchronize()
        assert out.is_cuda and out.shape[0] == n, "decode_clip(device='cuda') left the GPU"

    def torch_filtered(path, spec, n):
        out = video.decode_clip(path, spec, n, device="cuda")
        torch.cuda.synchronize()
        assert out.is_cuda

    def torchcodec(path, n):
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(str(path), device="cuda").get_frames_in_range(0, n)
        torch.cuda.synchronize()

    ff = shutil.which("ffmpeg")
    results: dict[str, dict] = {}
    notes = []
    clips = [(name, size, "libx264") for name, size in SIZES.items()]
    clips.append(("1080p_hevc", SIZES["1080p"], "libx265"))
    clips.append(("4k", (3840, 2160), "libx264"))
    for name, size, codec in clips:
        path = make_clip(name.split("_")[0], size, args.seconds, codec)
        n = count_frames(path)
        row: dict[str, object] = {"frames": n}
        row["mmfeed"] = fps(n, repeat(lambda: mmfeed(path, n), args.repeats))
        if codec == "libx264" and name in ("1080p", "4k"):
            rows, why = ffmpeg_rows.cuda_rows(path, size, n, args.repeats, repeat, fps,
                                              torch_filtered)
            row.update(rows)
            notes.extend(f"{name}: {w}" for w in why)
        if ff is not None:
            cmd = [ff, "-hide_banner", "-nostdin", "-loglevel", "error", "-hwaccel", "cuda",
                   "-hwaccel_output_format", "cuda", "-i", str(path), "-f", "null", "-"]
            try:
                row["ffmpeg"] = fps(n, repeat(lambda: subprocess.run(cmd, check=True),
                                              args.repeats))
            except subprocess.CalledProcessError as e:
                notes.append(f"ffmpeg -hwaccel cuda failed ({e}); is it built with NVDEC?")
        try:
            row["torchcodec"] = fps(n, repeat(lambda: torchcodec(path, n), args.repeats))
        except Exception as e:  # noqa: BLE001 - reported, the figure does not need it
            notes.append(f"torchcodec CUDA: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        results[name] = row
    for name, row in results.items():
        cells = "  ".join(f"{k} {v[0]:.1f} ({v[1]:.0f}..{v[2]:.0f})" for k, v in row.items()
                          if isinstance(v, tuple))
        print(f"# {name}: {row['frames']} frames; frames/s median (min..max): {cells}")
    for note in notes:
        print(f"# {note}")
    big = results["1080p"]
    if "ffmpeg" not in big:
        print("decode_cuda: no NVDEC-capable ffmpeg CLI, no limit to judge against",
              file=sys.stderr)
        return 1
    extra = {name: {k: (round(v[0], 1) if isinstance(v, tuple) else v) for k, v in row.items()}
             for name, row in results.items()}
    hevc = results.get("1080p_hevc", {})
    hevc_ratio = (round(hevc["mmfeed"][0] / hevc["ffmpeg"][0], 3)
                  if "ffmpeg" in hevc and "mmfeed" in hevc else None)
    print(f"# 1080p HEVC: mmfeed / ffmpeg -hwaccel cuda = {hevc_ratio}")
    report("decode_cuda", big["mmfeed"][0], "frames/s",
           "ffmpeg -hwaccel cuda -f null (1080p H.264)", big["ffmpeg"][0], args.json,
           results=extra, hevc_ratio=hevc_ratio, target_ratio=0.9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
