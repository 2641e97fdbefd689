"""THE pipeline: one sample's raw files -> the model inputs, the same for disk and ring.

`mm-producer preprocess` (disk sink) and `mm-producer run` (ring sink) both call
`Pipeline(config).process(sample)`, so a sample from the cache and one from the ring are made
by the same code and share a schema for a given config; the trainer can mix them in a batch.
A live clip (video and audio demuxed together from one open of a stream, plus the watched
sensor files aligned with it) is made by `Pipeline.process_clip`, the same per-input code.
What is stored beside the arrays - their schema and the `SampleMeta` record - is built by
`describe()` (schema by `schema_of`, record by `sample_meta`) for the ring and the cache alike.

Model inputs (name -> array):

    video   uint8   (T, C, H, W)   decode_clip: T = clip_frames, C/H/W from the filter spec
    audio   float32 (1, M, F)      log_mel: M = audio.n_mels, F = audio.n_frames
    lidar   float32 (3, H, W)      bev(load_points): grid from the BevConfig
    radar   float32 (1, H, W)      range_doppler / range_azimuth; (3, H, W) for points_bev
    <stem>  float32 (...)          one per unknown sensor (`imu.data` -> `imu`; a sequence
                                   `imu_0001.data`... -> `imu`): its metadata dtype/shape,
                                   else (unknown_len,)

Decisions (documented in docs/dataset.md too):
- Which file feeds `lidar` / `radar` / `video` / `audio` is `config.sensors[input]`; without a
  setting, the plain stem (`lidar`) when present, else the first of that kind in sorted order.
  A sensor that is set but absent from a sample is NOT replaced by another one (that would mix
  two viewpoints under one input): the input is left out and a note says so.
- A sample missing an input that others have is processed with what it has. The schema then
  lacks that input; the trainer groups batches by schema and the model zero-fills. The
  preprocess report notes it, so a folder missing its audio by mistake is visible.
- Long recordings: a frame sequence (`lidar_0001.bin`, `lidar_0002.bin` ...; grouped by
  producer/dataset.py) is one sensor named by its base (`lidar`, `lidar_top`, `imu`), chosen
  by the same `sensors` setting, and feeds ONE frame to its input, so the input keeps its
  single-frame shape. The frame is the one nearest in time (align.py, vectorised) to:
  the centre of the video clip's chosen frames (their presentation times come from the same
  decode, `decode_clip(times=...)`, on the CPU and NVDEC paths alike); without a decoded
  clip (no video, video not enabled), the segment's centre; without a
  segment, the sequence's first frame. Frame times: metadata `timestamps.<base>` (list),
  per-file `timestamps.<stem>`, or `frame_rates.<base>` (align.frame_timestamps); missing
  or bad ones are an InputError naming metadata.json and the field, raised before anything
  is decoded. Tolerance: metadata `tolerance_s`, else half the sequence's median period.
  When some clip frames have no sequence frame within tolerance, the alignment report goes
  into the notes; when the chosen frame itself is beyond tolerance, that input is left out
  with a note naming the file, the timestamp field and the offset, and the rest of the
  sample (video, other inputs) is kept - as for a missing modality. Why the clip centre:
  it is the live producer's rule for watched-folder files too (`aligned_watch_files`).
- A bad file raises InputError from its modality function (no separate validate() pass: the
  reader that understands the format is the one that can say what is wrong). An unexpected
  exception inside a modality is turned into an InputError naming the file, so one odd file
  can never stop a daemon or a preprocess run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from protocol.errors import InputError
from protocol.ffmpeg_chain import parse_chain
from protocol.filters import FilterSpec
from protocol.schema import UNLABELLED, ModalitySpec, SampleMeta, SampleSchema
from protocol.stages import StageTimer, now_ns
from protocol.video_store import StoreSettings

from .align import align, default_tolerance, frame_timestamps, timestamp_field
from .dataset import METADATA, SampleFiles
from .metadata import timestamp_ns
from .modalities import audio, lidar, radar, unknown, video
from .media_clips import ClipFrames
from .modalities._limits import ReadLimits
from .modalities._out import fits
from .modalities.audio import AudioConfig
from .modalities.lidar import BevConfig
from .modalities.radar import RadarConfig

#: Model inputs fed by one chosen file of their kind; unknown sensors add one input per stem.
INPUTS = ("video", "audio", "lidar", "radar")
#: Only inputs with more than one way to process them take a method.
METHODS = {"radar": tuple(radar.METHODS)}
#: Bump when the code changes what an unchanged config produces: every cached sample is redone.
#: 2: frame sequences feed their aligned frame (and unknown sequences one input), not files.
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides what a sample's arrays look like; a new value is a new
    generation for the ring and a new `config_hash()` for the cache.

    `filter` also accepts a spec string; `enabled` None means every input the sample has.
    """

    filter: FilterSpec = field(default_factory=FilterSpec)
    clip_frames: int = 8
    segment: tuple[float, float] | None = None
    sensors: dict[str, str] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=lambda: {"radar": "range_doppler"})
    audio: AudioConfig = field(default_factory=AudioConfig)
    lidar: BevConfig = field(default_factory=BevConfig)
    radar: RadarConfig = field(default_factory=RadarConfig)
    unknown_len: int = 256
    enabled: frozenset[str] | None = None
    #: Most bytes a lidar/radar/unknown file may have (modalities/_limits.py); defaults with
    #: $MMFEED_READ_LIMITS applied. Not in to_dict()/config_hash(): it decides which files
    #: are read, not what a file becomes.
    read_limits: ReadLimits = field(default_factory=ReadLimits.from_env)
    #: How `preprocess` stores the video in the cache (protocol/video_store.py; a store name
    #: takes its measured defaults). Not what a sample's arrays are, so the ring ignores it;
    #: in to_dict()/config_hash() only when not raw (a rerun with another store redoes every
    #: record; raw caches made before stores existed keep their hash).
    video_store: StoreSettings = field(default_factory=StoreSettings)
    #: An operator's FFmpeg filter chain (`mmctl filter --ffmpeg`; protocol/ffmpeg_chain.py),
    #: run on decoded frames before the filter spec; None: none. In to_dict() only when set,
    #: so caches made without one keep their hash.
    ffmpeg_chain: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.filter, str):
            put("filter", FilterSpec.parse(self.filter))
        if not isinstance(self.filter, FilterSpec):
            raise TypeError(f"PipelineConfig.filter: expected FilterSpec or str, got "
                            f"{type(self.filter).__name__}")
        if isinstance(self.clip_frames, bool) or not isinstance(self.clip_frames, int) \
                or self.clip_frames < 1:
            raise ValueError(f"PipelineConfig.clip_frames: expected an int >= 1, got "
                             f"{self.clip_frames!r}")
        if self.segment is not None:
            try:
                start, end = (float(x) for x in self.segment)
            except (TypeError, ValueError):
                raise ValueError(f"PipelineConfig.segment: expected (start_s, end_s), got "
                                 f"{self.segment!r}") from None
            if not 0 <= start < end:
                raise ValueError(f"PipelineConfig.segment: expected 0 <= start < end, got "
                                 f"({start}, {end})")
            put("segment", (start, end))
        sensors = dict(self.sensors)
        for inp, stem in sensors.items():
            if inp not in INPUTS:
                raise ValueError(f"PipelineConfig.sensors: input {inp!r} is not one of "
                                 f"{', '.join(INPUTS)}")
            if not isinstance(stem, str) or not stem or "/" in stem or "." in stem:
                raise ValueError(f"PipelineConfig.sensors[{inp!r}]: expected a file stem like "
                                 f"'{inp}_front', got {stem!r}")
        put("sensors", sensors)
        methods = {"radar": "range_doppler", **dict(self.methods)}
        for inp, method in methods.items():
            if inp not in METHODS:
                raise ValueError(f"PipelineConfig.methods: input {inp!r} has no methods; "
                                 f"inputs with methods: {', '.join(METHODS)}")
            if method not in METHODS[inp]:
                raise ValueError(f"PipelineConfig.methods[{inp!r}]: expected one of "
                                 f"{', '.join(METHODS[inp])}, got {method!r}")
        put("methods", methods)
        if isinstance(self.unknown_len, bool) or not isinstance(self.unknown_len, int) \
                or self.unknown_len < 1:
            raise ValueError(f"PipelineConfig.unknown_len: expected an int >= 1, got "
                             f"{self.unknown_len!r}")
        if not isinstance(self.read_limits, ReadLimits):
            put("read_limits", ReadLimits().with_settings(self.read_limits))
        if isinstance(self.video_store, str):
            put("video_store", StoreSettings.for_store(self.video_store))
        if not isinstance(self.video_store, StoreSettings):
            raise TypeError(f"PipelineConfig.video_store: expected StoreSettings or a store "
                            f"name, got {type(self.video_store).__name__}")
        if self.ffmpeg_chain is not None:
            put("ffmpeg_chain", parse_chain(self.ffmpeg_chain).text)  # ChainError: refused
        if self.enabled is not None:
            if isinstance(self.enabled, str):
                raise TypeError("PipelineConfig.enabled: expected a set of input names, got a str")
            put("enabled", frozenset(self.enabled))

    def with_changes(self, **changes: Any) -> "PipelineConfig":
        """A copy with run-time switches applied (what `mmctl filter/sensor/method/segment`
        send). `sensors` and `methods` are merged into the current ones, so
        `with_changes(sensors={"lidar": "lidar_front"})` keeps the other inputs' settings;
        `filter` may be a spec string. Raises ValueError/FilterSpecError on bad values."""
        for key in ("sensors", "methods"):
            if key in changes:
                changes[key] = {**getattr(self, key), **dict(changes[key])}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able canonical form: what `config_hash` hashes and `status` can show."""
        return {
            "pipeline_version": PIPELINE_VERSION,
            "filter": str(self.filter),
            "clip_frames": self.clip_frames,
            "segment": list(self.segment) if self.segment is not None else None,
            "sensors": dict(sorted(self.sensors.items())),
            "methods": dict(sorted(self.methods.items())),
            "audio": dataclasses.asdict(self.audio),
            "lidar": dataclasses.asdict(self.lidar),
            "radar": dataclasses.asdict(self.radar),
            "unknown_len": self.unknown_len,
            "enabled": sorted(self.enabled) if self.enabled is not None else None,
            **({"video_store": self.video_store.to_dict()}
               if self.video_store.store != "raw" else {}),
            **({"ffmpeg": self.ffmpeg_chain} if self.ffmpeg_chain is not None else {}),
        }

    def config_hash(self) -> str:
        """Hex digest of `to_dict()`: equal configs hash equal in every process (no Python
        hash(), whose string seed differs per process; sets are sorted first)."""
        enc = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.blake2b(enc.encode(), digest_size=16).hexdigest()


#: Schemas remembered by layout (name, dtype, shape per input) at most.
SCHEMAS_KEPT = 256
_schemas: dict[tuple, SampleSchema] = {}


def schema_of(arrays: Mapping[str, Any]) -> SampleSchema:
    """The schema of made arrays (names, dtypes, shapes, in order): what the ring slot and the
    cache record carry beside the payload. Remembered by layout, so the ring's hot path builds
    no ModalitySpec per sample. `str(dtype)`: numpy arrays and (NVDEC video) torch CUDA
    tensors alike."""
    key = tuple((n, str(a.dtype), tuple(a.shape), getattr(a, "mm_layout", ""))
                for n, a in arrays.items())  # the layout: yuv420 planes of a BT.709 and a
    # BT.601 source have one shape but not one schema (protocol/schema.py PackedArray)
    schema = _schemas.get(key)
    if schema is None:
        schema = SampleSchema(tuple(ModalitySpec.from_array(n, a) for n, a in arrays.items()))
        if len(_schemas) > SCHEMAS_KEPT:
            _schemas.clear()
        _schemas[key] = schema
    return schema


def sample_meta(sample: SampleFiles | None = None, *, generation: int = 0, index: int = 0,
                label: int | None = None, timestamp: int | None = None,
                source: str | None = None) -> SampleMeta:
    """The fixed-size record stored beside a sample's payload: label, time, source key,
    generation, running index. A dataset sample gives its own label, metadata time and key;
    a keyword given overrides it (a live clip has no SampleFiles: it gives all three)."""
    if sample is not None:
        label = sample.label if label is None else label
        timestamp = timestamp_ns(sample.metadata) if timestamp is None else timestamp
        source = sample.key if source is None else source
    return SampleMeta(label=UNLABELLED if label is None else label,
                      timestamp_ns=timestamp or 0, generation=generation,
                      source=source or "", index=index)


def describe(arrays: Mapping[str, Any], sample: SampleFiles | None = None, *,
             generation: int = 0, index: int = 0, label: int | None = None,
             timestamp: int | None = None, source: str | None = None
             ) -> tuple[SampleSchema, SampleMeta]:
    """(schema, meta) of one made sample: the one place both are built, for a ring slot and
    a cache record alike (`schema_of`, `sample_meta`)."""
    return schema_of(arrays), sample_meta(sample, generation=generation, index=index,
                                          label=label, timestamp=timestamp, source=source)


def aligned_watch_files(clip, times: Mapping[str, np.ndarray],
                        paths: Mapping[str, list[Path]]
                        ) -> tuple[dict[str, Path], list[tuple[str, float, float]]]:
    """The watched sensor files that go with a live clip: per stem, the file nearest the
    clip's centre in time (`align`, the rule `process` uses for frame sequences), within the
    clip's span (at least 0.5 s). Returns (stem -> file, misses) with a miss per stem that has
    files but none near: (stem, offset of the nearest in s, tolerance in s). `times`: stem ->
    int64 ns, sorted (WatchFolder.times); `paths`: stem -> files in the same order."""
    out: dict[str, Path] = {}
    misses: list[tuple[str, float, float]] = []
    centre = np.array([clip.timestamp_ns / 1e9 + (clip.end_s - clip.start_s) / 2])
    for stem, t in times.items():
        if t.size == 0:
            continue
        tol = max((clip.end_s - clip.start_s), 0.5)
        a = align(centre, t / 1e9, tol, stem)
        if a.index[0] >= 0:
            out[stem] = paths[stem][a.index[0]]
        else:
            misses.append((stem, float(a.offset_s[0]), tol))
    return out, misses


class Pipeline:
    """Applies one PipelineConfig; cheap to build, holds no open files (fork-safe).

    `video_device="cuda"` decodes video with NVDEC and returns it as a CUDA tensor (the other
    inputs stay numpy): what the daemon does when its ring slots live in GPU memory, so frames
    go from bitstream to model without a host copy. It is not part of PipelineConfig because it
    does not change what a sample means (tests/test_video.py states the CPU/GPU tolerance);
    without a GPU it decodes on the CPU and says so once.
    """

    def __init__(self, config: PipelineConfig | None = None, *, video_device: str = "cpu",
                 timer: StageTimer | None = None):
        if video_device not in ("cpu", "cuda"):
            raise ValueError(f"video_device must be 'cpu' or 'cuda', got {video_device!r}")
        self.config = config if config is not None else PipelineConfig()
        self.video_device = video_device
        self.timer = timer  # the daemon's per-stage timing (protocol/stages.py); None: untimed

    def _on(self, name: str) -> bool:
        return self.config.enabled is None or name in self.config.enabled

    def process_clip(self, clip, watched: Mapping[str, Path] | None = None,
                     folder: Path | None = None,
                     out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A live clip's sample: its video and audio (demuxed together, so a listen-once
        stream has both; `clip` as media_clips/sources make it) plus what this pipeline makes
        of the `watched` sensor files aligned with it (`aligned_watch_files`, from `folder`),
        cut to the clip's span. InputError names a bad watched file. `out`: as in `process`:
        the clip's frames, converted ahead on the clip thread (media_clips.ClipFrames), are
        written into `out["video"]` when it fits, else into an array of their own; a clip
        that came as an array (yuv420, the ffmpeg child) is handed on as it is."""
        into = out or {}
        out: dict[str, np.ndarray] = {}
        cfg = self.config
        if self._on("video"):
            v = clip.video
            if isinstance(v, ClipFrames):
                view = into.get("video")
                v = v.write_into(view) if fits(view, v.shape, np.uint8) else np.asarray(v)
            out["video"] = v
        if clip.audio is not None and self._on("audio"):
            # The clip's span, padded or cut to the configured length: the same shape and
            # meaning as `log_mel(file, segment=(start, end))` of a recorded sample.
            t0 = now_ns()
            samples = np.zeros(cfg.audio.n_samples, np.float32)
            n = min(clip.audio.size, samples.size)
            samples[:n] = clip.audio[:n]
            out["audio"] = audio.log_mel_from_samples(samples, cfg.audio, into.get("audio"))
            if self.timer is not None:
                self.timer.stage("audio", "pipeline").since(t0)
        wanted = {n for n in (watched or {}) if self._on(n)}
        if not wanted:
            return out
        sample = SampleFiles("live", "", UNLABELLED, folder, dict(watched), {})
        config = cfg.with_changes(enabled=frozenset(wanted), segment=(clip.start_s, clip.end_s))
        out.update(Pipeline(config, video_device=self.video_device, timer=self.timer
                            ).process(sample, None, into))
        return out

    def sensor_for(self, sample: SampleFiles, inp: str, notes: list[str] | None = None
                   ) -> str | None:
        """The sensor (a file stem or a sequence's base) that feeds model input `inp` in this
        sample, or None (see module doc)."""
        names = sample.sensors(inp)
        chosen = self.config.sensors.get(inp)
        if chosen is not None:
            if chosen in names:
                return chosen
            if notes is not None and names:
                notes.append(f"{sample.key}: {inp} sensor {chosen!r} absent (has "
                             f"{', '.join(names)}); {inp} left out")
            return None
        if not names:
            return None
        return inp if inp in names else names[0]

    def _jobs(self, sample: SampleFiles, notes: list[str] | None) -> list[tuple[str, str]]:
        """(model input, sensor) pairs this sample feeds: one rule for inputs_of and process."""
        jobs = [(i, self.sensor_for(sample, i, notes)) for i in INPUTS if self._on(i)]
        jobs += [(s, s) for s in sample.sensors("unknown") if self._on(s)]
        return [(name, sensor) for name, sensor in jobs if sensor is not None]

    def inputs_of(self, sample: SampleFiles) -> list[str]:
        """The model inputs `process` would produce for this sample (no decoding). A sequence
        frame beyond tolerance is only found by `process`, which then leaves it out with a
        note."""
        return [name for name, _ in self._jobs(sample, None)]

    def _one(self, inp: str, path: Path, meta: dict, notes: list[str] | None,
             times: list[float] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        c = self.config
        if inp == "video":
            return video.decode_clip(path, c.filter, c.clip_frames, c.segment, notes,
                                     device=self.video_device, times=times,
                                     chain=c.ffmpeg_chain, out=out)
        if inp == "audio":
            return audio.log_mel(path, c.audio, c.segment, notes, out)
        if inp == "lidar":
            return lidar.bev(lidar.load_points(path, meta, notes, c.read_limits), c.lidar, out)
        if inp == "radar":
            return radar.process(path, c.methods["radar"], c.radar, meta, notes, c.read_limits,
                                 out)
        return unknown.load_unknown(path, meta, c.unknown_len, notes, c.read_limits, out)

    def _aligned_frame(self, sample: SampleFiles, name: str, sensor: str, times: np.ndarray,
                       clip_times: np.ndarray | None, notes: list[str] | None
                       ) -> Path | None:
        """The frame file of sequence `sensor` that feeds `name`, or None (left out, noted)."""
        frames = sample.frames(sensor)
        meta = sample.metadata
        if "tolerance_s" in meta:
            tol, tol_from = float(meta["tolerance_s"]), "tolerance_s"
        else:
            tol, tol_from = default_tolerance(times), f"half the median {sensor} frame period"
        if clip_times is not None and clip_times.size:
            target = float(clip_times.min() + clip_times.max()) / 2
            where = "the video clip's centre"
            report = align(clip_times, times, tol, sensor).report
            if report.misaligned and notes is not None:
                notes.append(f"{report} (clip {clip_times.min():.3f}..{clip_times.max():.3f} s, "
                             f"{len(frames)} {sensor} frames)")
        elif self.config.segment is not None:
            start, end = self.config.segment
            target = (start + end) / 2 if np.isfinite(end) else start
            where = "the segment's centre"
        else:
            return frames[0]
        a = align(np.array([target]), times, tol, sensor)
        i = int(a.nearest[0])
        if a.index[0] >= 0:
            return frames[i]
        if notes is not None:
            field = timestamp_field(meta, sensor, sample.sequences[sensor][i])
            notes.append(f"{frames[i].name} (the {sensor} frame nearest {where}, "
                         f"{target:.3f} s) is {float(a.offset_s[0]):+.3f} s off by {METADATA} "
                         f"{field}, beyond the tolerance {tol:.3f} s ({tol_from}); {name} "
                         f"left out")
        return None

    def process(self, sample: SampleFiles, notes: list[str] | None = None,
                into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Model input name -> array for one sample; InputError names the bad file/field.

        `into`: name -> a view to make that input in (a loaned ring slot's, producer/
        slot_fill.py); an input whose view fits is made there and its value IS the view, one
        that does not fit (another shape: the schema changed) gets an array of its own."""
        into = into or {}
        out: dict[str, np.ndarray] = {}
        meta = sample.metadata
        jobs = self._jobs(sample, notes)
        # Every used sequence's times, checked before anything is decoded.
        meta_path = sample.metadata_path or sample.dir / METADATA
        seq_times = {sensor: frame_timestamps(meta, sensor, sample.frames(sensor), meta_path)
                     for _, sensor in jobs if sensor in sample.sequences}
        clip_times: np.ndarray | None = None
        for name, sensor in jobs:  # video first (INPUTS order): its times align the others
            meta_for = meta
            lent = None  # the frame stem that borrowed the sequence's metadata section
            if sensor in sample.sequences:
                path = self._aligned_frame(sample, name, sensor, seq_times[sensor], clip_times,
                                           notes)
                if path is None:
                    continue
                stem = path.name.split(".", 1)[0]
                if isinstance(meta.get(sensor), dict) and stem not in meta:
                    meta_for = {**meta, stem: meta[sensor]}  # the sensor's section fits each frame
                    lent = stem
            else:
                path = sample.files[sensor]
            times: list[float] | None = [] if name == "video" else None
            t0 = now_ns()
            try:
                out[name] = self._one(name, path, meta_for, notes, times, into.get(name))
                if self.timer is not None:
                    self.timer.stage(name if name in INPUTS else "unknown", "pipeline").since(t0)
            except InputError as e:
                prefix = f"metadata.{lent}."
                if lent is not None and e.field.startswith(prefix):
                    # name the section the user wrote (`imu`), not the frame that borrowed it
                    raise InputError(e.path, f"metadata.{sensor}.{e.field[len(prefix):]}",
                                     e.expected, e.found) from None
                raise
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as e:  # an odd file must not stop the run: report it like bad input
                raise InputError(path, name, f"a file the {name if name in INPUTS else 'unknown'}"
                                 f" reader accepts", f"{type(e).__name__}: {e}") from e
            if times:
                clip_times = np.asarray(times, dtype=np.float64)
        if not out:
            raise InputError(sample.dir, "inputs", "at least one enabled model input (enabled: "
                             f"{sorted(self.config.enabled) if self.config.enabled else 'all'})",
                             ", ".join(sorted(sample.files)) or "no files")
        return out


def frame_problem(sample: SampleFiles, cfg: PipelineConfig) -> str | None:
    """Why `cfg`'s crop does not fit the frames of the video feeding `sample` (probed), or
    None: what the producer refuses before a change instead of a crop silently clamped."""
    pipeline = Pipeline(cfg)
    if cfg.filter.crop is None or not pipeline._on("video"):
        return None
    sensor = pipeline.sensor_for(sample, "video")
    path = sample.files.get(sensor) if sensor is not None else None
    size = _frame_size(path) if path is not None else None
    if size is None:
        return None
    return cfg.filter.frame_problem(*size, f"{path.name} in sample {sample.key}")


def _frame_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a video file's first video stream, or None when it cannot be read
    (the proof then says what is wrong with the file)."""
    try:
        with video.open_container(path) as c:
            cc = video.first_video_stream(c, path).codec_context
            return int(cc.width), int(cc.height)
    except InputError:
        return None


def union_inputs(pipeline: Pipeline, samples: Iterable[SampleFiles]) -> list[str]:
    """Every input any sample produces, in output order: what a sample 'should' have."""
    seen: dict[str, None] = {}
    for s in samples:
        for name in pipeline.inputs_of(s):
            seen.setdefault(name, None)
    return list(seen)


def missing_inputs(pipeline: Pipeline, sample: SampleFiles, expected: Iterable[str]
                   ) -> list[str]:
    have = set(pipeline.inputs_of(sample))
    return [n for n in expected if n not in have and n in INPUTS]


__all__ = ["INPUTS", "METHODS", "PIPELINE_VERSION", "Pipeline", "PipelineConfig",
           "aligned_watch_files", "describe", "frame_problem", "missing_inputs", "sample_meta", "schema_of",
           "union_inputs"]
