"""Preprocess throughput: samples/s of `run_preprocess` on a synthetic dataset, per modality,
each beside the floor it cannot beat, measured in the same run on the same files.

    python -m bench.preprocess [--quick] [--json] [--profile PATH]

Figures
- preprocess: samples/s of a full run (index + workers + pack + CacheWriter + commit) into a
  fresh cache, `--workers` = all cores, forkserver already running (the first, "cold" run,
  which also pays the workers' imports, is reported beside it). Limit: the same samples'
  floor work (below) spread ideally over the same workers, i.e.
  N / (sum of per-sample floor seconds / workers).
- Fair limit: the floors run single-threaded (decoder thread_count=1), exactly as each worker
  decodes (`_init_worker`); a floor timed with one decoder thread per core and then divided
  by the worker count again would count the cores twice.
- per modality, serial, one thread, the modality function alone over every sample vs its floor:
    video  decode_clip (decode + swscale to planar RGB + copy)  vs  PyAV decode of the same
           first T frames with no conversion (the decoder alone)
    audio  log_mel (decode + resample + STFT + mel)             vs  PyAV decode of the same wav
    lidar  load_points + bev                                    vs  np.fromfile of the bytes
    radar  radar.process (load_adc + range_doppler)             vs  np.fromfile of the bytes
    imu    load_unknown                                         vs  np.fromfile of the bytes
A pyinstrument profile of one serial in-process run (`workers=0`) says where the rest of the
time goes (printed to stderr; `--profile PATH` also saves the HTML). For the worker processes
themselves: `py-spy record --subprocesses -f raw -o OUT -- python -m bench.preprocess`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from bench._common import machine, report, repeat
from producer.dataset import index_dataset
from producer.modalities import audio, lidar, radar, unknown, video
from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.synth import make_dataset


def _raw_video(path: Path, frames: int) -> None:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.codec_context.thread_count = 1  # as in a worker (see the module doc)
        for i, _ in enumerate(c.decode(s)):
            if i + 1 >= frames:
                break


def _raw_audio(path: Path) -> None:
    with av.open(str(path)) as c:
        for _ in c.decode(c.streams.audio[0]):
            pass


def _modalities(samples, cfg: PipelineConfig) -> dict[str, tuple]:
    """input -> (function over all samples, floor over all samples)."""
    def files(stem):
        return [(s.files[stem], s.metadata) for s in samples if stem in s.files]

    v, a, li, ra, im = files("video"), files("audio"), files("lidar"), files("radar"), files("imu")
    read = lambda items: [np.fromfile(p, np.uint8) for p, _ in items]  # noqa: E731
    return {
        "video": (lambda: [video.decode_clip(p, cfg.filter, cfg.clip_frames) for p, _ in v],
                  lambda: [_raw_video(p, cfg.clip_frames) for p, _ in v], "PyAV raw decode"),
        "audio": (lambda: [audio.log_mel(p, cfg.audio) for p, _ in a],
                  lambda: [_raw_audio(p) for p, _ in a], "PyAV raw decode"),
        "lidar": (lambda: [lidar.bev(lidar.load_points(p, m), cfg.lidar) for p, m in li],
                  lambda: read(li), "raw read"),
        "radar": (lambda: [radar.process(p, "range_doppler", cfg.radar, m) for p, m in ra],
                  lambda: read(ra), "raw read"),
        "imu": (lambda: [unknown.load_unknown(p, m, cfg.unknown_len) for p, m in im],
                lambda: read(im), "raw read"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", type=Path, help="also save the pyinstrument HTML here")
    ap.add_argument("--size", default="320x240", help="video WxH of the synthetic clips")
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.split("x"))
    per_class = {"train": 4 if args.quick else 40}
    repeats = 2 if args.quick else 3
    workers = os.cpu_count() or 1
    cfg = PipelineConfig(filter="resize=112x112", clip_frames=8)
    # The serial figures and floors below run as a worker does: one thread each.
    import torch

    torch.set_num_threads(1)
    video.set_decode_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        root = make_dataset(tmp / "dataset", per_class=per_class, size=(w, h), clip_seconds=2.0,
                            seed=0)
        samples = index_dataset(root).samples
        n = len(samples)
        print(f"# {n} samples, video {w}x{h} 2 s -> {cfg.clip_frames}x3x112x112, "
              f"{workers} workers; load average {os.getloadavg()[0]:.2f}; {machine()}", file=sys.stderr)

        per: dict[str, dict] = {}
        floor_total = 0.0
        for name, (fn, floor, floor_name) in _modalities(samples, cfg).items():
            t, f = repeat(fn, repeats), repeat(floor, repeats)
            floor_total += f.median
            per[name] = {"samples_per_s": round(n / t.median, 1),
                         "limit_name": floor_name, "limit_samples_per_s": round(n / f.median, 1),
                         "ratio": round(f.median / t.median, 3)}
            print(f"  {name:6s} {n / t.median:9.1f} samples/s | {floor_name} "
                  f"{n / f.median:9.1f} samples/s | ratio {f.median / t.median:.2f}",
                  file=sys.stderr)

        caches = iter(range(1000))

        def full_run() -> None:
            cache = tmp / f"cache{next(caches)}"
            s = run_preprocess(root, cache, cfg, workers=workers, progress=False)
            assert s["processed"] == n and not s["rejected"], s["rejected"]
            shutil.rmtree(cache)

        t0 = time.perf_counter()
        full_run()  # the cold run: starts the forkserver (imports torch, av, numpy once)
        cold_s = time.perf_counter() - t0
        t = repeat(full_run, repeats, warmup=0)
        print(f"  cold run (forkserver start included) {n / cold_s:.1f} samples/s",
              file=sys.stderr)
        figure = n / t.median
        limit = n / (floor_total / workers)

        try:
            from pyinstrument import Profiler

            prof = Profiler(interval=0.001)
            prof.start()
            run_preprocess(root, tmp / "cache-prof", cfg, workers=0, progress=False)
            prof.stop()
            print(prof.output_text(unicode=False, color=False, show_all=False)[:6000],
                  file=sys.stderr)
            if args.profile:
                args.profile.write_text(prof.output_html())
        except ImportError:
            print("# pyinstrument not installed: no profile", file=sys.stderr)

        return report("preprocess", figure, "samples/s",
                      f"decode/read floor over {workers} cores", limit, args.json,
                      samples=n, workers=workers, per_modality=per,
                      cold_run_samples_per_s=round(n / cold_s, 1),
                      run_seconds=[round(x, 3) for x in t.seconds],
                      load_avg=[round(x, 2) for x in os.getloadavg()],
                      serial_floor_s_per_sample=round(floor_total / n, 5))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
