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
- curve: samples/s of full runs with 1 and 2 workers (up to `--workers`), each beside the
  floor over that many cores, the load average at each point, and a written prediction for 16
  cores from the measured per-sample worker CPU and the parent's per-sample CPU (the parent
  stores every record alone, so it caps the pool).
- long run and steady state: the same samples LONG_RUN times over (new sample directories)
  in one run. `steady` = the extra samples / the extra seconds: the rate a long dataset runs
  at, against the same floor; `fixed` = what a run pays once whatever its length (pool start,
  first decodes, commit). A 120-sample run is mostly fixed cost at 100+ samples/s.
- in-worker vs isolated: CPU seconds per sample of each modality function run inside a pool
  worker (the preprocess initializer: one thread per library, producer/worker_threads.py),
  with every worker busy at once, beside the same function alone in this process. A ratio
  well above 1 is oversubscription or per-sample setup that isolation hides (issue 20 found
  OpenBLAS's threads: 35x on the log-mel). CPU time, not wall time, so a loaded machine skews
  it much less than the samples/s figures; judge a loaded run by these ratios.
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

LONG_RUN = 4  # the long run: the dataset this many times over


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


def _cpu_per_modality(keys: list[str], cfg_filter: str, clip_frames: int, root: str
                      ) -> dict[str, float]:
    """Runs INSIDE a pool worker: CPU seconds of each modality function over these samples."""
    by_key = {s.key: s for s in index_dataset(Path(root)).samples}
    cfg = PipelineConfig(filter=cfg_filter, clip_frames=clip_frames)
    out = {}
    for name, (fn, _, _) in _modalities([by_key[k] for k in keys], cfg).items():
        c0 = time.thread_time()
        fn()
        out[name] = time.thread_time() - c0
    return out


def _in_worker_cpu(samples, cfg: PipelineConfig, workers: int, root: Path) -> dict[str, float]:
    """CPU s per sample per modality inside `workers` busy pool workers (the preprocess ones)."""
    from concurrent.futures import ProcessPoolExecutor

    from producer.preprocess_workers import _init_worker, start_worker_server

    keys = [s.key for s in samples]
    shares = [keys[k::workers] for k in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=start_worker_server(), initializer=_init_worker,
                             initargs=(cfg, None, os.getpid())) as pool:
        args = (str(cfg.filter), cfg.clip_frames, str(root))
        list(pool.map(_cpu_per_modality, [sh[:2] for sh in shares], *[[a] * workers for a in args]))
        parts = list(pool.map(_cpu_per_modality, shares, *[[a] * workers for a in args]))
    return {name: sum(p[name] for p in parts) / len(keys) for name in parts[0]}


def _replicate(root: Path, dst: Path, times: int) -> Path:
    """`root`'s samples `times` over, as new sample directories (hard links where the file
    system allows, else copies): the same per-sample work and floor, a longer run."""
    for sample in sorted(p for p in root.glob("*/*/*") if p.is_dir()):
        split, cls, name = sample.parts[-3:]
        for k in range(times):
            out = dst / split / cls / f"{name}-{k}"
            shutil.copytree(sample, out, copy_function=_link_or_copy)
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
    # The serial figures and floors below run as a worker does: one thread per library.
    from producer.worker_threads import single_threaded

    single_threaded()

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
        alone_cpu: dict[str, float] = {}
        for name, (fn, floor, floor_name) in _modalities(samples, cfg).items():
            c0 = time.process_time()
            t = repeat(fn, repeats)
            alone_cpu[name] = (time.process_time() - c0) / (repeats + 1) / n
            f = repeat(floor, repeats)
            floor_total += f.median
            per[name] = {"samples_per_s": round(n / t.median, 1),
                         "limit_name": floor_name, "limit_samples_per_s": round(n / f.median, 1),
                         "ratio": round(f.median / t.median, 3)}
            print(f"  {name:6s} {n / t.median:9.1f} samples/s | {floor_name} "
                  f"{n / f.median:9.1f} samples/s | ratio {f.median / t.median:.2f}",
                  file=sys.stderr)

        in_worker = _in_worker_cpu(samples, cfg, workers, root)
        print(f"  CPU ms per sample inside {workers} busy workers vs alone (load average "
              f"{os.getloadavg()[0]:.2f}):", file=sys.stderr)
        for name, cpu in in_worker.items():
            per[name]["cpu_ms_in_worker"] = round(cpu * 1e3, 3)
            per[name]["cpu_ms_alone"] = round(alone_cpu[name] * 1e3, 3)
            print(f"    {name:6s} {cpu * 1e3:7.2f} ms vs {alone_cpu[name] * 1e3:7.2f} ms | "
                  f"ratio {cpu / max(alone_cpu[name], 1e-9):.2f}", file=sys.stderr)
        worker_cpu = sum(in_worker.values())
        alone_total = sum(alone_cpu.values())
        print(f"    sum    {worker_cpu * 1e3:7.2f} ms vs {alone_total * 1e3:7.2f} ms | ratio "
              f"{worker_cpu / max(alone_total, 1e-9):.2f}", file=sys.stderr)

        caches = iter(range(1000))
        parent_cpu: list[float] = []

        def full_run(k: int, data: Path = root, expect: int = n) -> None:
            cache = tmp / f"cache{next(caches)}"
            c0 = os.times()
            s = run_preprocess(data, cache, cfg, workers=k, progress=False)
            c1 = os.times()
            parent_cpu.append(c1.user - c0.user + c1.system - c0.system)
            assert s["processed"] == expect and not s["rejected"], s["rejected"]
            shutil.rmtree(cache)

        t0 = time.perf_counter()
        full_run(workers)  # the cold run: starts the forkserver (imports torch, av, numpy once)
        cold_s = time.perf_counter() - t0
        print(f"  cold run (forkserver start included) {n / cold_s:.1f} samples/s",
              file=sys.stderr)
        curve = []
        for k in sorted({1, min(2, workers), workers}):
            parent_cpu.clear()
            tk = repeat(lambda: full_run(k), repeats, warmup=0)
            load = os.getloadavg()[0]
            floor_k = n / (floor_total / k)
            curve.append({"workers": k, "samples_per_s": round(n / tk.median, 1),
                          "floor_samples_per_s": round(floor_k, 1),
                          "ratio": round(n / tk.median / floor_k, 3), "load_avg": round(load, 2),
                          "parent_cpu_ms_per_sample": round(min(parent_cpu) / n * 1e3, 3)})
            print(f"  workers {k:2d}: {n / tk.median:8.1f} samples/s | floor over {k} cores "
                  f"{floor_k:8.1f} | ratio {n / tk.median / floor_k:.2f} | load average "
                  f"{load:.2f}", file=sys.stderr)
        t = tk
        figure = n / t.median
        limit = n / (floor_total / workers)
        if len(curve) > 1:
            print(f"  speedup {curve[-1]['workers']} vs 1 worker: "
                  f"{curve[-1]['samples_per_s'] / curve[0]['samples_per_s']:.2f}x (ideal "
                  f"{curve[-1]['workers']}x)", file=sys.stderr)
        # Steady state: the same samples LONG_RUN times over in one run. The difference of the
        # two runs' times is per-sample work only, so it splits the rate a long dataset runs at
        # from the fixed cost every run pays once (pool start, first decodes, commit).
        big = _replicate(root, tmp / "dataset-long", LONG_RUN)
        n_big = n * LONG_RUN
        t_big = repeat(lambda: full_run(workers, big, n_big), repeats, warmup=0)
        steady = (n_big - n) / max(t_big.median - t.median, 1e-9)
        fixed_s = max(t.median - n / steady, 0.0)
        steady_row = {"samples": n_big, "samples_per_s": round(n_big / t_big.median, 1),
                      "steady_samples_per_s": round(steady, 1),
                      "steady_ratio": round(steady / limit, 3),
                      "fixed_s_per_run": round(fixed_s, 3),
                      "load_avg": round(os.getloadavg()[0], 2)}
        print(f"  long run, {n_big} samples: {n_big / t_big.median:8.1f} samples/s | steady "
              f"state {steady:8.1f} samples/s vs floor {limit:8.1f} | ratio "
              f"{steady / limit:.2f} | fixed cost per run {fixed_s:.3f} s | load average "
              f"{steady_row['load_avg']:.2f}", file=sys.stderr)
        # The same two runs the way records were stored before: workers hand each record back
        # through a scratch file, the parent copies it into its shard, and the commit's fsync
        # writes the whole shard (producer/worker_shard.py, producer/writeback.py).
        from producer.preprocess import PARENT_COPY_ENV
        from producer.writeback import WRITEBACK_ENV

        before_env = {PARENT_COPY_ENV: "1", WRITEBACK_ENV: "0"}
        parent_cpu.clear()
        full_run(workers, big, n_big)
        parent_now = parent_cpu[-1] / n_big
        os.environ.update(before_env)
        try:
            parent_cpu.clear()
            t_small0 = repeat(lambda: full_run(workers), repeats, warmup=0)
            t_big0 = repeat(lambda: full_run(workers, big, n_big), repeats, warmup=0)
            parent_before = parent_cpu[-1] / n_big
        finally:
            for k in before_env:
                del os.environ[k]
        steady0 = (n_big - n) / max(t_big0.median - t_small0.median, 1e-9)
        steady_row["parent_cpu_ms_per_sample"] = round(parent_now * 1e3, 3)
        steady_row["before"] = {
            "how": "parent copies each record from a worker scratch file; whole disk write at "
                   "commit", "steady_samples_per_s": round(steady0, 1),
            "steady_ratio": round(steady0 / limit, 3),
            "parent_cpu_ms_per_sample": round(parent_before * 1e3, 3)}
        print(f"  before (the parent copies each record, the disk write all at commit): steady "
              f"state {steady0:8.1f} samples/s | ratio {steady0 / limit:.2f} | now "
              f"{steady / max(steady0, 1e-9):.2f}x | parent CPU {parent_before * 1e3:.2f} -> "
              f"{parent_now * 1e3:.2f} ms a sample | load average {os.getloadavg()[0]:.2f}",
              file=sys.stderr)
        parent_s = curve[-1]["parent_cpu_ms_per_sample"] / 1e3
        pool16 = 16 / max(worker_cpu, 1e-9)
        predicted16 = min(pool16, 1 / max(parent_s, 1e-9))
        prediction = (f"16 cores: ~{predicted16:.0f} samples/s predicted = min(16 workers / "
                      f"{worker_cpu * 1e3:.2f} ms worker CPU per sample = {pool16:.0f}, 1 / "
                      f"{parent_s * 1e3:.2f} ms parent CPU per sample = "
                      f"{1 / max(parent_s, 1e-9):.0f}); assumes 16 physical cores, the dataset "
                      f"in the page cache and the cache on a disk that keeps up"
                      + ("; the parent (one process storing every record) is the cap"
                         if pool16 > 1 / max(parent_s, 1e-9) else ""))
        print(f"  prediction: {prediction}", file=sys.stderr)

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
                      samples=n, workers=workers, per_modality=per, curve=curve,
                      worker_cpu_ms_per_sample=round(worker_cpu * 1e3, 3),
                      alone_cpu_ms_per_sample=round(alone_total * 1e3, 3),
                      prediction_16_cores=prediction,
                      cold_run_samples_per_s=round(n / cold_s, 1), long_run=steady_row,
                      run_seconds=[round(x, 3) for x in t.seconds],
                      load_avg=[round(x, 2) for x in os.getloadavg()],
                      serial_floor_s_per_sample=round(floor_total / n, 5))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
