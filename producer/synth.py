"""Synthetic datasets of REAL encoded files whose class can be learned from every modality.

WHY: the demo and the tests need a dataset that goes through exactly the code paths a user's
data does (PyAV decode of H.264, WAV decode + resampling, KITTI .bin parsing, radar ADC cube
FFTs, unknown-sensor bytes), yet is small, made in seconds, and deterministic for a seed. A
dataset of noise would train to chance and hide a broken pipeline; here each class leaves a
mark in every modality, so a model that learns proves the bytes arrived intact:

    modality   file                  what differs per class k (with per-sample jitter + noise)
    ---------  --------------------  -----------------------------------------------------------
    video      video.mp4 (H.264)     shape drawn: disc / square / stripes / ring ..., moving
    audio      audio.wav (16 kHz)    tone at 330 * 1.5**k Hz
    lidar      lidar.bin (KITTI x4)  object on the ground: cylinder / box / wall, random pose
    lidar      lidar_front.bin       the same scene seen from 2 m further forward (some samples)
    radar      radar.bin             complex int16 ADC cube (32 chirps x 64 samples x 4 rx) with
                                     a target at a class-specific range and Doppler bin
    unknown    imu.data              float32 (50, 6) oscillation at a class-specific rate; its
                                     dtype/shape are in metadata.json for even samples only
    -          metadata.json         timestamp_ns, frame_rates, calibration, radar and imu sections

`make_bad_samples()` adds one sample folder per bad-input case next to good ones,
`make_long_recording()` writes a long-recording sample (a video of several seconds beside a
sequence of lidar frame files with their timestamps), and `link_real_recordings()`
assembles sample folders from the real recordings (`REAL_DIR`, $MMFEED_REAL_DATA).
"""
from __future__ import annotations

import json
import os
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

DEFAULT_CLASSES = ("circle", "square", "stripes")
RADAR_SHAPE = (32, 64, 4)  # chirps, samples, rx
IMU_SHAPE = (50, 6)
FPS = 10
SAMPLE_RATE = 16000


# --- one modality each ----------------------------------------------------------------------


def _frames(k: int, rng: np.random.Generator, size: tuple[int, int], n: int) -> np.ndarray:
    """(n, H, W, 3) uint8: class k's shape moving across a noisy background."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.arange(n, dtype=np.float32)[:, None, None]
    r = min(w, h) * rng.uniform(0.18, 0.26)
    cx0, cy0 = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    vx, vy = rng.uniform(-1.5, 1.5, 2)
    dx = xx[None] - (cx0 + vx * t)
    dy = yy[None] - (cy0 + vy * t)
    kind = k % 4
    if kind == 0:
        mask = dx * dx + dy * dy <= r * r                            # disc
    elif kind == 1:
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)                 # square
    elif kind == 2:
        mask = np.sin((xx[None] + 2.0 * t) * (np.pi / 4)) > 0        # moving vertical stripes
    else:
        d2 = dx * dx + dy * dy
        mask = (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)                # ring
    colour = np.array([[230, 60, 40], [40, 200, 60], [50, 80, 230], [220, 200, 40]])[kind]
    colour = np.clip(colour + rng.integers(-20, 21, 3), 0, 255)
    bg = rng.integers(20, 60)
    frames = np.full((n, h, w, 3), bg, np.int16)
    frames += rng.integers(-12, 13, frames.shape, dtype=np.int16)
    frames[mask] = colour
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """H.264 (yuv420p) in MP4 via PyAV; one thread so the bytes depend only on the frames."""
    n, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = {"preset": "ultrafast", "crf": "18", "g": str(fps)}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Mono signed 16-bit PCM WAV from float samples in [-1, 1]."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _tone(k: int, rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(round(seconds * rate)), dtype=np.float64) / rate
    f = 330.0 * 1.5 ** k * rng.uniform(0.97, 1.03)
    return 0.4 * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.05 * rng.standard_normal(t.size)


def _scene(k: int, rng: np.random.Generator, shift_x: float = 0.0) -> np.ndarray:
    """(N, 4) float32 KITTI points: a ground plane plus class k's object at a random pose."""
    n_ground, n_obj = 1500, 600
    ground = np.column_stack([rng.uniform(-20, 20, n_ground), rng.uniform(-20, 20, n_ground),
                              rng.normal(-1.6, 0.03, n_ground), rng.uniform(0.05, 0.3, n_ground)])
    cx, cy = rng.uniform(-10, 10, 2)
    yaw = rng.uniform(0, np.pi)
    kind = k % 3
    u, v = rng.uniform(0, 1, n_obj), rng.uniform(0, 1, n_obj)
    if kind == 0:  # cylinder, radius 1.2 m, 2 m tall
        a = 2 * np.pi * u
        local = np.column_stack([1.2 * np.cos(a), 1.2 * np.sin(a), 2.0 * v])
    elif kind == 1:  # box 3 x 3 x 1.5 m: points on its four sides
        side = rng.integers(0, 4, n_obj)
        s = 3.0 * u - 1.5
        px = np.where(side < 2, s, np.where(side == 2, -1.5, 1.5))
        py = np.where(side < 2, np.where(side == 0, -1.5, 1.5), s)
        local = np.column_stack([px, py, 1.5 * v])
    else:  # wall 8 m long, 3 m high, 0.2 m thick
        local = np.column_stack([8.0 * u - 4.0, rng.uniform(-0.1, 0.1, n_obj), 3.0 * v])
    c, s_ = np.cos(yaw), np.sin(yaw)
    obj = np.column_stack([cx + c * local[:, 0] - s_ * local[:, 1],
                           cy + s_ * local[:, 0] + c * local[:, 1],
                           local[:, 2] - 1.6, rng.uniform(0.5, 1.0, n_obj)])
    pts = np.vstack([ground, obj])
    pts[:, 0] -= shift_x
    pts[:, :3] += rng.normal(0, 0.02, (pts.shape[0], 3))
    return pts.astype("<f4")


def _radar_cube(k: int, rng: np.random.Generator, shape=RADAR_SHAPE) -> np.ndarray:
    """(chirps, samples, rx, 2) int16 I/Q: one target at class k's range and Doppler bins."""
    chirps, samples, rx = shape
    rbin = 6 + 10 * (k % 5) + rng.uniform(-1, 1)
    dbin = -8 + 6 * (k % 4) + rng.uniform(-0.5, 0.5)
    c = np.arange(chirps)[:, None, None]
    n = np.arange(samples)[None, :, None]
    a = np.arange(rx)[None, None, :]
    phase = 2 * np.pi * (rbin * n / samples + dbin * c / chirps + 0.25 * a) + rng.uniform(0, 6.3)
    sig = 900 * np.exp(1j * phase)
    sig = sig + rng.normal(0, 60, sig.shape) + 1j * rng.normal(0, 60, sig.shape)
    iq = np.stack([sig.real, sig.imag], axis=-1)
    return np.round(iq).astype("<i2")


def _imu(k: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(IMU_SHAPE[0], dtype=np.float32)[:, None] / 50.0
    f = (1.0 + 2.0 * k) * rng.uniform(0.9, 1.1)
    phases = rng.uniform(0, 2 * np.pi, IMU_SHAPE[1])
    return (np.sin(2 * np.pi * f * t + phases) + 0.1 * rng.standard_normal(IMU_SHAPE)).astype("<f4")


# --- whole samples ---------------------------------------------------------------------------


def make_sample(sdir: Path, k: int, rng: np.random.Generator, *, index: int,
                size: tuple[int, int] = (64, 48), clip_seconds: float = 1.0,
                extras: bool = True, audio_rate: int = SAMPLE_RATE) -> Path:
    """Write one sample folder of class k; returns it."""
    sdir.mkdir(parents=True, exist_ok=True)
    n_frames = max(1, int(round(clip_seconds * FPS)))
    write_video(sdir / "video.mp4", _frames(k, rng, size, n_frames))
    write_wav(sdir / "audio.wav", _tone(k, rng, clip_seconds, audio_rate), audio_rate)
    scene_seed = int(rng.integers(1 << 62))  # lidar and lidar_front see one scene
    _scene(k, np.random.default_rng(scene_seed)).tofile(sdir / "lidar.bin")
    meta: dict = {
        "timestamp_ns": 1_700_000_000_000_000_000 + index * 1_000_000_000,
        "frame_rates": {"video": FPS, "lidar": 10},
        "calibration": {"lidar": {"extrinsic": np.eye(4).tolist()}},
    }
    if extras:
        if index % 3 == 0:
            _scene(k, np.random.default_rng(scene_seed), shift_x=2.0).tofile(
                sdir / "lidar_front.bin")
        _radar_cube(k, rng).tofile(sdir / "radar.bin")
        meta["radar"] = {"format": "adc", "dtype": "complex_int16", "shape": list(RADAR_SHAPE),
                         "layout": "chirp_sample_rx"}
        _imu(k, rng).tofile(sdir / "imu.data")
        if index % 2 == 0:
            meta["imu"] = {"dtype": "float32", "shape": list(IMU_SHAPE)}
    (sdir / "metadata.json").write_text(json.dumps(meta, indent=1))
    return sdir


def make_dataset(root: str | Path, *, classes: tuple[str, ...] = DEFAULT_CLASSES,
                 per_class: dict[str, int] | None = None, seed: int = 0,
                 size: tuple[int, int] = (64, 48), clip_seconds: float = 1.0,
                 extras: bool = True) -> Path:
    """Write `root/<split>/<class>/<NNNN>/` for every split in `per_class` (samples per class;
    default train 8, val 4). `size` is (width, height) of the video, even numbers.
    Deterministic for a seed: the same call makes the same content."""
    root = Path(root)
    per_class = {"train": 8, "val": 4} if per_class is None else per_class
    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    rng = np.random.default_rng(seed)
    index = 0
    for split, n in per_class.items():
        for k, cls in enumerate(classes):
            for i in range(n):
                make_sample(root / split / cls / f"{i:04d}", k, rng, index=index, size=size,
                            clip_seconds=clip_seconds, extras=extras)
                index += 1
    return root


# --- long recordings ------------------------------------------------------------------------

#: how make_long_recording writes its lidar frame times into metadata.json
STAMP_STYLES = ("list", "per_file", "rate", "none")


def make_long_recording(sdir: str | Path, k: int = 0, *, seed: int = 0, seconds: float = 3.0,
                        size: tuple[int, int] = (64, 48), sensor: str = "lidar",
                        rate: float = 5.0, offset_s: float = 0.0, stamps: str = "list",
                        tolerance_s: float | None = None) -> list[float]:
    """One sample folder: `video.mp4` of `seconds` at FPS and lidar frames
    `<sensor>_0001.bin`, `<sensor>_0002.bin` ... at `rate` Hz from `offset_s` to the end of
    the video, each frame its own scene (class k's object at a new random pose), so which
    frame fed the BEV can be told from the output. `stamps` says how metadata.json gives the
    frame times (STAMP_STYLES: a list under timestamps.<sensor>, one number per file stem,
    frame_rates.<sensor> with a start time when offset, or nothing). Returns the frame times
    (seconds, the video's clock) in frame order."""
    if stamps not in STAMP_STYLES:
        raise ValueError(f"stamps must be one of {', '.join(STAMP_STYLES)}, got {stamps!r}")
    sdir = Path(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_video(sdir / "video.mp4", _frames(k, rng, size, max(1, int(round(seconds * FPS)))))
    n = max(2, int(np.floor((seconds - offset_s) * rate)) + 1)
    times = [round(offset_s + i / rate, 6) for i in range(n)]
    stems = [f"{sensor}_{i + 1:04d}" for i in range(n)]
    for stem in stems:
        _scene(k, np.random.default_rng(int(rng.integers(1 << 62)))).tofile(sdir / f"{stem}.bin")
    meta: dict = {"timestamp_ns": 1_700_000_000_000_000_000, "frame_rates": {"video": FPS}}
    if stamps == "list":
        meta["timestamps"] = {sensor: times}
    elif stamps == "per_file":
        meta["timestamps"] = dict(zip(stems, times))
    elif stamps == "rate":
        meta["frame_rates"][sensor] = rate
        if offset_s:
            meta["timestamps"] = {sensor: offset_s}
    if tolerance_s is not None:
        meta["tolerance_s"] = tolerance_s
    (sdir / "metadata.json").write_text(json.dumps(meta, indent=1))
    return times


# --- bad input ------------------------------------------------------------------------------

#: case -> (file the report must name, relative to the sample folder; field it must name)
BAD_CASES = {
    # moov atom at the end: cut in half, the file does not open as a container
    "truncated_video": ("video.mp4", "container"),
    "lidar_not_multiple_of_16": ("lidar.bin", "size"),
    "metadata_invalid_json": ("metadata.json", "json"),
    "metadata_wrong_type": ("metadata.json", "radar.shape"),
    "radar_size_disagrees": ("radar.bin", "shape"),
    "empty_folder": ("", "files"),
    "unreadable_file": ("video.mp4", "file"),
    # hostile files that used to stop the whole run (exit 1, nothing cached):
    "video_symlink_loop": ("video.mp4", "file"),                 # video.mp4 -> video.mp4
    "metadata_nested_2000_deep": ("metadata.json", "json"),      # RecursionError in json
    "metadata_5000_digit_integer": ("metadata.json", "imu.offset"),  # int() digit limit
    "timestamp_ns_2_pow_64": ("metadata.json", "timestamp_ns"),  # passed checks, broke commit
    "timestamp_1e300": ("metadata.json", "timestamp"),           # OverflowError to ns
}
#: cases that are cached with a note, never rejected. A case's key is
#: `train/circle/bad_<case>`: the non-UTF-8 folder's case name is its escaped key
#: (protocol/names.py), so the same parametrised tests check that the key round-trips.
NOTED_CASES = {"audio_48k": "resampled 48000 Hz -> 16000 Hz", "missing_audio": "no audio",
               "non_utf8_file_name": "its input is named imu_xff",
               "non_utf8_folder_name\\xff": "folder name is not plain UTF-8 text"}


def make_bad_samples(root: str | Path, *, split: str = "train", class_name: str = "circle",
                     seed: int = 99) -> dict[str, Path]:
    """Add one sample folder per bad-input case under root/split/class_name/bad_<case>;
    returns case -> folder. Rejected cases: BAD_CASES; cached-with-a-note: NOTED_CASES.

    The unreadable file is a directory named video.mp4: unlike chmod 000 (which root ignores)
    it cannot be read by anyone, so the case runs the same as root and as a user.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    cdir = root / split / class_name
    k = 0
    made: dict[str, Path] = {}

    def good(case: str) -> Path:
        d = make_sample(cdir / f"bad_{case}", k, rng, index=1, clip_seconds=1.0)
        made[case] = d
        return d

    d = good("truncated_video")
    data = (d / "video.mp4").read_bytes()
    (d / "video.mp4").write_bytes(data[: len(data) // 2])

    d = good("lidar_not_multiple_of_16")
    with open(d / "lidar.bin", "ab") as f:
        f.write(b"\0" * 6)  # divisible by neither 16 (KITTI) nor 20 (nuScenes), nor even 4

    d = good("metadata_invalid_json")
    (d / "metadata.json").write_text('{"timestamp_ns": 1, "radar": {"shape": [32, 64, 4]')

    d = good("metadata_wrong_type")
    meta = json.loads((d / "metadata.json").read_text())
    meta["radar"]["shape"] = "abc"
    (d / "metadata.json").write_text(json.dumps(meta))

    d = good("radar_size_disagrees")
    _radar_cube(k, rng, (32, 64, 2)).tofile(d / "radar.bin")  # metadata still says 4 rx

    d = cdir / "bad_empty_folder"
    d.mkdir(parents=True, exist_ok=True)
    made["empty_folder"] = d

    d = good("unreadable_file")
    (d / "video.mp4").unlink()
    (d / "video.mp4").mkdir()

    d = good("audio_48k")
    write_wav(d / "audio.wav", _tone(k, rng, 1.0, 48000), 48000)

    d = good("missing_audio")
    (d / "audio.wav").unlink()

    d = good("video_symlink_loop")
    (d / "video.mp4").unlink()
    os.symlink("video.mp4", d / "video.mp4")

    d = good("metadata_nested_2000_deep")
    meta = json.loads((d / "metadata.json").read_text())
    text = json.dumps(meta)
    (d / "metadata.json").write_text(text[:-1] + ', "deep": ' + "[" * 2000 + "]" * 2000 + "}")

    d = good("metadata_5000_digit_integer")
    meta = json.loads((d / "metadata.json").read_text())
    text = json.dumps({**meta, "imu": {"offset": 0}})
    (d / "metadata.json").write_text(text.replace('"offset": 0', '"offset": ' + "7" * 5000))

    for case, key, value in (("timestamp_ns_2_pow_64", "timestamp_ns", 2 ** 64),
                             ("timestamp_1e300", "timestamp", 1e300)):
        d = good(case)
        meta = json.loads((d / "metadata.json").read_text())
        meta.pop("timestamp_ns")
        meta[key] = value
        (d / "metadata.json").write_text(json.dumps(meta))

    # Names that are not UTF-8 (byte 0xff), as a Latin-1 tool writes them: cached, escaped.
    d = good("non_utf8_file_name")
    os.rename(d / "imu.data", os.fsencode(d / "imu") + b"\xff.data")
    d = good("non_utf8_folder_name")
    raw = os.fsencode(d)[: -len(b"name")] + b"name\xff"
    os.rename(os.fsencode(d), raw)
    del made["non_utf8_folder_name"]
    made["non_utf8_folder_name\\xff"] = Path(os.fsdecode(raw))
    return made


# --- real recordings ------------------------------------------------------------------------

#: The folder of real recordings (KITTI/nuScenes LiDAR, radar ADC cubes, speech, street video;
#: its README names their sources and licences) that the demo links into its dataset and some
#: tests read: $MMFEED_REAL_DATA, else `shared/data/real` beside the checkout. Optional: where
#: it is absent the demo runs on synthetic data only and those tests skip, naming the folder.
REAL_ENV = "MMFEED_REAL_DATA"
REAL_DIR = Path(os.environ.get(REAL_ENV)
                or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")


def link_real_recordings(root: str | Path, real_dir: str | Path = REAL_DIR, *,
                         split: str = "test", class_name: str = "real") -> list[Path]:
    """Assemble sample folders from the real recordings (symlinks, plus a metadata.json that
    says what the radar files are). Returns the folders made; [] when real_dir is absent.

    sample `0000`: person_walk video, JFK speech (16 kHz), KITTI scan as lidar.bin, nuScenes
    as lidar_top.pcd.bin, the Kinect PCD as lidar_kinect.pcd, the DCA1000 radar frame.
    sample `0001`: car-detection video (with an AAC track), ALSA speech (48 kHz, resampled),
    the OpenRadar .npy cube and the View-of-Delft radar point list as radar_points.bin.
    """
    real = Path(real_dir)
    if not real.is_dir():
        return []
    root = Path(root)
    plans = {
        "0000": ({"video.mp4": "person_walk_5s_384x216_h264.mp4",
                  "audio.wav": "jfk_speech_16k_mono.wav",
                  "lidar.bin": "kitti_000008.bin",
                  "lidar_top.pcd.bin": "nuscenes_LIDAR_TOP_1532402927647951.pcd.bin",
                  "lidar_kinect.pcd": "pcl_kinect_frame_20121214T142256.332395.pcd",
                  "radar.bin": "openradar_adc_frame_dca1000_layout.bin"},
                 {"radar": {"format": "adc", "dtype": "complex_int16", "shape": [256, 128, 4],
                            "layout": "dca1000", "tx": 2},
                  "lidar_top": {"fields": ["x", "y", "z", "intensity", "ring"]}}),
        "0001": ({"video.mp4": "intel_car-detection.mp4",
                  "audio.wav": "alsa_Front_Center.wav",
                  "radar.npy": "openradar_adc_frame_128x8x128.npy",
                  "radar_points.bin": "vod_radar_00549.bin"},
                 {"radar": {"format": "adc", "layout": "chirp_rx_sample"},
                  "radar_points": {"format": "points", "fields": 7}}),
    }
    made = []
    for name, (links, meta) in plans.items():
        if not all((real / src).exists() for src in links.values()):
            continue
        d = root / split / class_name / name
        d.mkdir(parents=True, exist_ok=True)
        for dst, src in links.items():
            if (d / dst).is_symlink() or (d / dst).exists():
                (d / dst).unlink()
            os.symlink(real / src, d / dst)
        (d / "metadata.json").write_text(json.dumps(meta, indent=1))
        made.append(d)
    return made

