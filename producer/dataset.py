"""The input index: `dataset/{train,val,test}/<class>/<sample>/` -> labelled samples + problems.

Layout (docs/dataset.md; docs/architecture.md "Contracts"):

    dataset/<split>/<class>/<sample>/
        video.mp4  audio.wav  lidar.bin  lidar_front.bin  radar.bin  imu.data  metadata.json

- A sample's label is its class folder's position in `classes`, the sorted union of class
  folders over EVERY split on disk (not only the ones indexed), so `--split train` and
  `--split val` runs agree on labels.
- A file's stem is its name up to the first dot (`lidar_top.pcd.bin` -> `lidar_top`), the
  same rule the modalities use to find their metadata section. Its kind comes from the stem's
  prefix (video*, audio*, lidar*, radar*), else from the extension (.pcd -> lidar, common
  video/audio containers), else it is an unknown sensor - never dropped.
- Frame sequences (long recordings): two or more lidar, radar or unknown-sensor files named
  `<base>_<digits>` (`lidar_0001.bin`, `lidar_0002.bin` ...; `lidar_top_0001.bin` -> base
  `lidar_top`) are ONE sensor named by the base, its frames in frame-number order
  (`SampleFiles.sequences`). The pipeline picks the frame aligned with the video clip by
  metadata timestamps (producer/pipeline.py). A lone `lidar_0001.bin` stays a single-file
  sensor under its own stem, as before; video and audio files never form sequences (a
  stream has its own time base). A base that is also a file's stem (`lidar.bin` beside
  `lidar_0001.bin`, `lidar_0002.bin`) would give two sensors one name: the sample is
  rejected naming the file.
- Names are text: class and sample folder names go through `protocol.names.escape_name`, so
  a name that is not UTF-8 (`bad_\xff`) is cached under an escaped key that maps back to its
  bytes (`unescape_name`), with a note; file stems go through `modality_name` (an input name
  the schema accepts: `imu\xff.data` -> input `imu_xff`), with a note. The files themselves
  are opened by their real names. A symlink loop (`video.mp4 -> video.mp4`)
  is a rejected sample naming the file.
- Indexing never raises for one bad sample: an empty folder, an unreadable or non-regular
  file, two files with one stem, or a bad metadata.json becomes an InputError in `problems`
  and the sample is left out; every other sample is indexed. Only a missing root raises.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import InputError
from protocol.names import escape_name, modality_name

from .align import frame_sequences
from .metadata import load_metadata

SPLITS = ("train", "val", "test")
METADATA = "metadata.json"
KINDS = ("video", "audio", "lidar", "radar", "unknown")
#: Kinds whose `<base>_<digits>` files form one multi-frame sensor.
SEQUENCE_KINDS = ("lidar", "radar", "unknown")
_VIDEO_EXT = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".ts", ".h264"}
_AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus"}


def file_stem(path: str | Path) -> str:
    """`lidar_top.pcd.bin` -> `lidar_top`: the name up to the first dot."""
    return Path(path).name.split(".", 1)[0]


def kind_of(stem: str, path: str | Path | None = None) -> str:
    """video | audio | lidar | radar | unknown, by stem prefix, then by extension."""
    s = stem.lower()
    for k in ("video", "audio", "lidar", "radar"):
        if s.startswith(k):
            return k
    if path is not None:
        # a Path as it is: Path(path) re-parses it, and this runs ~90 times a sample in the
        # pipeline's sensor choice (issue 20 profile: 1.7 ms of a worker's ~16 ms a sample)
        ext = (path if isinstance(path, Path) else Path(path)).suffix.lower()
        if ext == ".pcd":
            return "lidar"
        if ext in _VIDEO_EXT:
            return "video"
        if ext in _AUDIO_EXT:
            return "audio"
    return "unknown"


@dataclass
class SampleFiles:
    """One sample folder: where it is, its label, and its modality files by stem."""

    split: str
    class_name: str
    label: int
    dir: Path
    files: dict[str, Path]
    metadata: dict = field(default_factory=dict)
    metadata_path: Path | None = None
    #: sensor base -> its frame stems in frame order (`lidar` -> [lidar_0001, lidar_0002]);
    #: filled by index_dataset. Empty for samples built elsewhere (the live daemon's watched
    #: folder aligns its files itself), so those keep one sensor per file.
    sequences: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`train/circle/0003`: the cache key; stable when the dataset folder moves. The
        folder name is escaped (protocol/names.py); `class_name` already is."""
        return f"{self.split}/{self.class_name}/{escape_name(self.dir.name)}"

    def kind(self, stem: str) -> str:
        return kind_of(stem, self.files[stem])

    def stems(self, kind: str) -> list[str]:
        """Sorted file stems of one kind (`lidar` -> ["lidar", "lidar_front"])."""
        return sorted(s for s, p in self.files.items() if kind_of(s, p) == kind)

    def sensors(self, kind: str) -> list[str]:
        """Sorted sensor names of one kind: single-file stems plus sequence bases
        (`lidar.bin, lidar_top_0001.bin, lidar_top_0002.bin` -> ["lidar", "lidar_top"]).
        What a `sensor` setting names and what unknown-sensor inputs are called."""
        framed = {st for stems in self.sequences.values() for st in stems}
        names = [s for s in self.stems(kind) if s not in framed]
        names += [b for b, stems in self.sequences.items()
                  if kind_of(stems[0], self.files[stems[0]]) == kind]
        return sorted(names)

    def frames(self, sensor: str) -> list[Path]:
        """The frame files of a sequence sensor in frame order; [] for a single-file one."""
        return [self.files[s] for s in self.sequences.get(sensor, ())]

    @property
    def all_paths(self) -> list[Path]:
        """Every file that shapes this sample's output (the incremental fingerprint)."""
        paths = list(self.files.values())
        if self.metadata_path is not None:
            paths.append(self.metadata_path)
        return paths


@dataclass
class DatasetIndex:
    classes: list[str]
    samples: list[SampleFiles]
    problems: list[InputError]
    splits: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. unknown metadata keys kept


def _check_readable(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise InputError(path, "file", "a readable regular file", what)
    try:
        # O_NONBLOCK: never hang on something that turned into a FIFO meanwhile.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(path, "file", "a readable regular file", e.strerror or str(e)) from None
    os.close(fd)


def _index_sample(split: str, class_name: str, label: int, sdir: Path,
                  notes: list[str]) -> SampleFiles:
    """One sample folder -> SampleFiles; InputError for the first problem found.
    `class_name` is the escaped class folder name."""
    key = f"{split}/{class_name}/{escape_name(sdir.name)}"
    if escape_name(sdir.name) != sdir.name:
        notes.append(f"{key}: folder name is not plain UTF-8 text; keyed as "
                     f"{escape_name(sdir.name)} (\\xHH is a byte that is not UTF-8; "
                     f"protocol.names.unescape_name gives the bytes back)")
    try:
        entries = [e for e in os.scandir(sdir) if not e.name.startswith(".")]
    except OSError as e:
        raise InputError(sdir, "folder", "a readable sample folder", e.strerror or str(e)) from None
    files: dict[str, Path] = {}
    meta_path = None
    for e in sorted(entries, key=lambda e: e.name):
        p = Path(e.path)
        try:
            st = e.stat()  # follows symlinks: a dataset of links to recordings is fine
        except OSError as err:
            raise InputError(p, "file", "a readable regular file",
                             err.strerror or str(err)) from None
        _check_readable(p, st)
        if e.name == METADATA:
            meta_path = p
            continue
        stem = modality_name(file_stem(e.name))
        if stem != file_stem(e.name):
            notes.append(f"{key}: file name {escape_name(e.name)} is not a plain input name "
                         f"(ASCII letters, digits, _ . -; UTF-8); its input is named {stem}")
        if stem in files:
            raise InputError(p, "file name", f"one file per stem; {files[stem].name} has the "
                             f"stem {stem!r} too", e.name)
        files[stem] = p
    if not files:
        found = "an empty folder" if meta_path is None else "only metadata.json"
        raise InputError(sdir, "files", "at least one modality file (video.mp4, audio.wav, "
                         "lidar.bin, radar.bin, <name>.data)", found)
    sequences = _sequences(files)
    metadata = {}
    if meta_path is not None:
        meta_notes: list[str] = []
        metadata = load_metadata(meta_path, meta_notes)
        notes.extend(f"{key}/{n}" for n in meta_notes)
    return SampleFiles(split, class_name, label, sdir, files, metadata, meta_path, sequences)


def _sequences(files: dict[str, Path]) -> dict[str, list[str]]:
    """base -> frame stems in order, for groups of two or more frames of a SEQUENCE_KIND;
    InputError when a base is also a file's stem or one group mixes kinds."""
    framable = {s: p for s, p in files.items() if kind_of(s, p) in SEQUENCE_KINDS}
    out: dict[str, list[str]] = {}
    for base, paths in frame_sequences(framable).items():
        if len(paths) < 2:
            continue
        if base in files:
            raise InputError(files[base], "file name", f"either {files[base].name} or frame "
                             f"files {base}_<n>.*, not both (they would be one sensor "
                             f"{base!r})", f"{files[base].name} and {len(paths)} frame files")
        kinds = {kind_of(file_stem(p), p) for p in paths}
        if len(kinds) > 1:
            raise InputError(paths[0], "file name", f"frame files of {base!r} all of one "
                             f"kind", ", ".join(sorted(kinds)))
        out[base] = [modality_name(file_stem(p)) for p in paths]
    return out


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_dataset(root: str | Path, splits: list[str] | tuple[str, ...] | None = None
                  ) -> DatasetIndex:
    """Index a dataset folder. `splits`: which of train/val/test to include (default: all
    present). Raises FileNotFoundError only when `root` is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    present = [s for s in SPLITS if (root / s).is_dir()]
    problems: list[InputError] = []
    if not present:
        problems.append(InputError(root, "splits", f"one or more split folders "
                                   f"({', '.join(SPLITS)})",
                                   ", ".join(p.name for p in _subdirs(root)) or "none"))
    wanted = present if splits is None else [s for s in present if s in set(splits)]
    class_dirs = {s: _subdirs(root / s) for s in present}
    classes = sorted({escape_name(d.name) for dirs in class_dirs.values() for d in dirs})
    label_of = {c: i for i, c in enumerate(classes)}
    samples: list[SampleFiles] = []
    notes: list[str] = []
    for split in wanted:
        for cdir in class_dirs[split]:
            for sdir in _subdirs(cdir):
                try:
                    cls = escape_name(cdir.name)
                    samples.append(_index_sample(split, cls, label_of[cls], sdir, notes))
                except InputError as e:
                    problems.append(e)
    return DatasetIndex(classes, samples, problems, wanted, notes)
