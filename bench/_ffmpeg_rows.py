"""FFmpeg filter-graph rows of bench.decode: the filter spec run by FFmpeg (issue 15).

CPU (`python -m bench.decode`):
  child_cpu_224     the supervised ffmpeg child (producer/ffmpeg_child.py) running
                    ffmpeg_graph.cpu_plan(resize=224x224) into the raw pipe, frames read
  ffmpeg_scale_224  `ffmpeg -i f -vf scale=224:224 -f null -`: the same CLI filter, no pipe
CUDA (`python -m bench.decode --device cuda`, 1080p and 4K):
  child_cuda_224    the child running ffmpeg_graph.cuda_plan(resize=224x224): NVDEC +
                    scale_cuda, frames downloaded and read from the pipe (the chosen route of
                    a media source on a GPU, video_route.py)
  ffmpeg_scale_cuda_224  `ffmpeg -hwaccel cuda -hwaccel_output_format cuda -i f
                    -vf scale_cuda=224:224 -f null -`: the ceiling of that route
  torch_224         video.decode_clip(resize=224x224, device="cuda"): NVDEC + torch kernels
                    (the dataset route it is weighed against)
"""
from __future__ import annotations

import shutil
import subprocess

from producer.ffmpeg_child import FfmpegChild
from producer.ffmpeg_graph import cpu_plan, cuda_plan
from protocol.filters import FilterSpec

SMALL = FilterSpec.parse("resize=224x224")


def _child_frames(path, plan) -> int:
    with FfmpegChild(str(path), plan) as child:
        return sum(1 for _ in child.frames())


def cpu_rows(path, size, n, repeats, repeat, fps) -> dict:
    row: dict = {}
    plan = cpu_plan(SMALL, *size)
    got = _child_frames(path, plan)
    if got != n:
        raise RuntimeError(f"ffmpeg child made {got} frames of {path}, expected {n}")
    row["child_cpu_224"] = fps(n, repeat(lambda: _child_frames(path, plan), repeats))
    ff = shutil.which("ffmpeg")
    if ff is not None:
        cmd = [ff, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), "-vf",
               "scale=224:224", "-f", "null", "-"]
        row["ffmpeg_scale_224"] = fps(n, repeat(lambda: subprocess.run(cmd, check=True),
                                                repeats))
    return row


def cuda_rows(path, size, n, repeats, repeat, fps, torch_decode) -> tuple[dict, list[str]]:
    """Rows of the CUDA-filter path; `torch_decode(path, spec, n)` runs the torch route."""
    row: dict = {}
    notes: list[str] = []
    plan = cuda_plan(SMALL, *size)
    try:
        row["child_cuda_224"] = fps(n, repeat(lambda: _child_frames(path, plan), repeats))
    except Exception as e:  # noqa: BLE001 - reported beside the other rows
        notes.append(f"ffmpeg CUDA child: {type(e).__name__}: {e}")
    ff = shutil.which("ffmpeg")
    if ff is not None:
        cmd = [ff, "-hide_banner", "-nostdin", "-loglevel", "error", "-hwaccel", "cuda",
               "-hwaccel_output_format", "cuda", "-i", str(path), "-vf", "scale_cuda=224:224",
               "-f", "null", "-"]
        try:
            row["ffmpeg_scale_cuda_224"] = fps(n, repeat(
                lambda: subprocess.run(cmd, check=True), repeats))
        except subprocess.CalledProcessError as e:
            notes.append(f"ffmpeg scale_cuda failed ({e}); does `ffmpeg -filters` list it?")
    row["torch_224"] = fps(n, repeat(lambda: torch_decode(path, SMALL, n), repeats))
    return row, notes
