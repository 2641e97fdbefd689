"""The sample schema: what a sample looks like, shared by the ring and the disk cache.

A sample is a set of named modalities (each a dense array with a dtype and a shape)
plus a small fixed-size record of metadata (label, timestamp, generation, source).
`SampleSchema` fixes the byte layout of the modalities inside one contiguous payload:
each modality starts at a 64-byte aligned offset, in the order given. A ring slot and
a cache record both hold exactly that payload, so a sample from disk and a sample
from the ring are read by the same code and can be mixed in one batch.

Readers never guess shapes: every slot and every cache record names the schema it
was written with (by `schema_id`, a hash of the canonical encoding, with the encoding
itself stored beside it once).

Packed layouts: a modality may say its bytes are not a dense array of its shape but a packed
form of it (`ModalitySpec.layout`). The one layout today is NV12 (`nv12/<matrix>/<range>`,
e.g. `nv12/bt601/limited`): a uint8 RGB clip of logical shape (..., 3, H, W) stored as its
NV12 planes, 1.5 bytes a pixel (a luma plane of H x W, then one interleaved chroma plane of
ceil(H/2) rows of 2 x ceil(W/2) bytes). `shape` stays the logical shape (what the model gets
once the trainer has converted it, on its device); `stored_shape` is what the payload holds,
(..., planes_bytes). A schema without layouts encodes exactly as before (same ids).
An optional fourth part names where the chroma samples sit: `nv12/bt709/limited/left` for
planes straight from an H.264/HEVC decoder (`pixel_format=yuv420`, chroma co-sited with the
even luma columns), absent (= centred) for the cache's nv12 store, whose planes swscale made
from RGB without a chroma-location tag.

A modality function hands a packed array to the schema as a `PackedArray` (the planes, with
`mm_layout` and `mm_shape`, the logical shape): `from_arrays` then records the layout, so
every writer (preprocess, the live daemon) tags it without knowing about it.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import SchemaError
from .names import MODALITY_NAME

ALIGN = 64
DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")
_NAME_RE = MODALITY_NAME  # protocol/names.py maps any file stem onto it
MAX_DIMS = 8
#: Packed layouts a modality may have ("" = a dense array of its dtype and shape).
NV12 = "nv12"
MATRICES = ("bt601", "bt709")
RANGES = ("limited", "full")
#: Chroma sample positions a layout may name (its optional fourth part); "center" by default.
SITINGS = ("center", "left")


def nv12_frame_bytes(height: int, width: int) -> int:
    """Bytes of one NV12 frame: H x W luma, then ceil(H/2) rows of 2 x ceil(W/2) chroma."""
    return height * width + 2 * ((height + 1) // 2) * ((width + 1) // 2)


def parse_layout(layout: str) -> tuple[str, str, str]:
    """`nv12/bt601/limited` -> ("nv12", "bt601", "limited"); SchemaError naming what is wrong."""
    parts = layout.split("/")
    if len(parts) not in (3, 4) or parts[0] != NV12 or parts[1] not in MATRICES \
            or parts[2] not in RANGES or (len(parts) == 4 and parts[3] != "left"):
        raise SchemaError(f"layout {layout!r}: expected nv12/<{'|'.join(MATRICES)}>/"
                          f"<{'|'.join(RANGES)}>[/left]")
    return parts[0], parts[1], parts[2]


def chroma_siting(layout: str) -> str:
    """"left" for a layout ending in /left (decoder planes), else "center"."""
    return "left" if layout.endswith("/left") else "center"


class PackedArray(np.ndarray):
    """Packed planes (..., planes_bytes) that know their layout and logical shape, so that
    `SampleSchema.from_arrays` records them as a packed modality (see the module doc). Views
    keep both attributes; anything else treats it as the uint8 array it is."""

    mm_layout: str = ""
    mm_shape: tuple = ()

    @classmethod
    def wrap(cls, planes: np.ndarray, layout: str, shape: tuple) -> "PackedArray":
        out = planes.view(cls)
        out.mm_layout, out.mm_shape = layout, tuple(shape)
        return out

    def __array_finalize__(self, obj) -> None:
        self.mm_layout = getattr(obj, "mm_layout", "")
        self.mm_shape = getattr(obj, "mm_shape", ())


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class ModalitySpec:
    """One named array of a sample: `video` uint8 (T, C, H, W), `lidar` float32 (C, H, W)..."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    layout: str = ""  # "" dense; "nv12/<matrix>/<range>": see the module docstring

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise SchemaError(
                f"modality name {self.name!r}: expected 1-64 characters of letters, digits, _ . -"
            )
        dt = np.dtype(self.dtype).name if self.dtype in DTYPES or _is_dtype(self.dtype) else None
        if dt not in DTYPES:
            raise SchemaError(
                f"modality {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}"
            )
        object.__setattr__(self, "dtype", dt)
        shape = tuple(self.shape)
        if not (0 < len(shape) <= MAX_DIMS) or not all(
            isinstance(d, (int, np.integer)) and d > 0 for d in shape
        ):
            raise SchemaError(
                f"modality {self.name!r}: shape {shape!r}: expected 1-{MAX_DIMS} positive integers"
            )
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        if not isinstance(self.layout, str):
            raise SchemaError(f"modality {self.name!r}: layout must be a str, got "
                              f"{type(self.layout).__name__}")
        if self.layout:
            parse_layout(self.layout)
            if dt != "uint8" or len(shape) < 3 or shape[-3] != 3:
                raise SchemaError(f"modality {self.name!r}: layout {self.layout!r} packs uint8 "
                                  f"RGB (..., 3, H, W), not {dt}{list(shape)}")

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the bytes in a payload: `shape`, or (..., planes) for a packed layout."""
        if not self.layout:
            return self.shape
        return self.shape[:-3] + (nv12_frame_bytes(self.shape[-2], self.shape[-1]),)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def numel(self) -> int:
        """Elements stored in a payload (of `stored_shape`)."""
        n = 1
        for d in self.stored_shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.layout:
            d["layout"] = self.layout
        return d

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> "ModalitySpec":
        """From a numpy array or a torch tensor (a CUDA one from NVDEC: torch.uint8 -> "uint8")."""
        dtype = getattr(array.dtype, "name", None) or str(array.dtype).removeprefix("torch.")
        layout = getattr(array, "mm_layout", "")
        if layout:  # a PackedArray: its logical shape, and the layout its planes are in
            return cls(name, dtype, tuple(array.mm_shape), layout)
        return cls(name, dtype, tuple(array.shape))

    def __repr__(self) -> str:
        packed = f"@{self.layout}" if self.layout else ""
        return f"{self.name}:{self.dtype}{list(self.shape)}{packed}"


def _is_dtype(s: object) -> bool:
    try:
        np.dtype(s)  # type: ignore[arg-type]
        return True
    except TypeError:
        return False


@dataclass(frozen=True)
class SampleSchema:
    """The modalities of a sample and their byte layout inside one payload."""

    modalities: tuple[ModalitySpec, ...]
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _index: dict = field(init=False, repr=False, compare=False)
    _encoded: bytes = field(init=False, repr=False, compare=False)
    _id: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mods = tuple(self.modalities)
        if not mods:
            raise SchemaError("a sample schema needs at least one modality")
        for m in mods:
            if not isinstance(m, ModalitySpec):
                raise SchemaError(f"expected ModalitySpec, got {type(m).__name__}")
        names = [m.name for m in mods]
        if len(set(names)) != len(names):
            raise SchemaError(f"modality names must be unique, got {names}")
        offsets, off = [], 0
        for m in mods:
            offsets.append(off)
            off = _align(off + m.nbytes)
        object.__setattr__(self, "modalities", mods)
        object.__setattr__(self, "_offsets", tuple(offsets))
        object.__setattr__(self, "_index", {m.name: i for i, m in enumerate(mods)})
        enc = json.dumps(
            {"modalities": [m.to_dict() for m in mods]}, separators=(",", ":"), sort_keys=True
        ).encode()
        object.__setattr__(self, "_encoded", enc)
        h = hashlib.blake2b(enc, digest_size=8).digest()
        # Never 0: 0 marks "no schema" in ring slots and cache indexes.
        object.__setattr__(self, "_id", int.from_bytes(h, "little") or 1)

    # --- construction ------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "SampleSchema":
        return cls(tuple(ModalitySpec.from_array(k, v if isinstance(v, PackedArray)
                                                 else np.asarray(v)) for k, v in arrays.items()))

    @classmethod
    def decode(cls, data: bytes | str) -> "SampleSchema":
        """Inverse of `encode`; raises SchemaError naming what was wrong."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise SchemaError(f"schema encoding is not JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("modalities"), list):
            raise SchemaError('schema encoding: expected {"modalities": [...]}')
        mods = []
        for i, m in enumerate(obj["modalities"]):
            if not isinstance(m, dict) or not ({"name", "dtype", "shape"} <= set(m)
                                               <= {"name", "dtype", "shape", "layout"}):
                raise SchemaError(f"schema modality #{i}: expected keys name, dtype, shape "
                                  f"(and optionally layout)")
            if not isinstance(m["shape"], list):
                raise SchemaError(f"schema modality #{i}: shape must be a list")
            mods.append(ModalitySpec(m["name"], m["dtype"], tuple(m["shape"]),
                                     m.get("layout", "")))
        return cls(tuple(mods))

    # --- layout ------------------------------------------------------------------------

    def encode(self) -> bytes:
        """Canonical compact JSON bytes (computed once, at construction)."""
        return self._encoded

    @property
    def schema_id(self) -> int:
        """64-bit hash of `encode()`: equal layouts have equal ids, in every process."""
        return self._id

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    @property
    def packed(self) -> bool:
        """True when some modality has a packed layout (the trainer unpacks it on its device)."""
        return any(m.layout for m in self.modalities)

    def unpacked(self) -> "SampleSchema":
        """The same modalities as dense arrays of their logical shapes (what a model sees)."""
        if not self.packed:
            return self
        return SampleSchema(tuple(ModalitySpec(m.name, m.dtype, m.shape)
                                  for m in self.modalities))

    @property
    def payload_nbytes(self) -> int:
        last = self.modalities[-1]
        return self._offsets[-1] + last.nbytes

    def spec(self, name: str) -> ModalitySpec:
        try:
            return self.modalities[self._index[name]]
        except KeyError:
            raise SchemaError(f"no modality {name!r}; the schema has {list(self.names)}") from None

    def offset(self, name: str) -> int:
        self.spec(name)
        return self._offsets[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def views(self, payload) -> dict[str, np.ndarray]:
        """Zero-copy arrays over a payload buffer (bytes, memoryview, mmap or uint8 array)."""
        buf = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, np.uint8)
        if buf.nbytes < self.payload_nbytes:
            raise SchemaError(
                f"payload of {buf.nbytes} bytes is smaller than the schema's {self.payload_nbytes}"
            )
        buf = buf.reshape(-1).view(np.uint8)
        out = {}
        for m, off in zip(self.modalities, self._offsets):
            out[m.name] = buf[off : off + m.nbytes].view(m.dtype).reshape(m.stored_shape)
        return out

    def pack_into(self, arrays: Mapping[str, np.ndarray], out) -> None:
        """Write `arrays` into a payload buffer; checks names, dtypes and shapes first."""
        self.check(arrays)
        views = self.views(out)
        for name, v in views.items():
            np.copyto(v, arrays[name], casting="no")

    def pack(self, arrays: Mapping[str, np.ndarray]) -> bytearray:
        out = bytearray(self.payload_nbytes)
        self.pack_into(arrays, out)
        return out

    def check(self, arrays: Mapping[str, np.ndarray]) -> None:
        if set(arrays) != set(self.names):
            raise SchemaError(
                f"sample has modalities {sorted(arrays)}, schema expects {sorted(self.names)}"
            )
        for m in self.modalities:
            a = arrays[m.name]
            if a.dtype.name != m.dtype or tuple(a.shape) != m.stored_shape:
                raise SchemaError(
                    f"modality {m.name!r}: expected {m.dtype}{list(m.stored_shape)}, "
                    f"got {a.dtype.name}{list(a.shape)}"
                )

    def __repr__(self) -> str:
        return f"SampleSchema({', '.join(map(repr, self.modalities))}; {self.payload_nbytes} B)"


# --- per-sample metadata ------------------------------------------------------------------

SOURCE_BYTES = 64
# index (u64), timestamp_ns (i64), generation (u32), label (i32), source (64 bytes utf-8)
META_STRUCT = struct.Struct(f"<QqIi{SOURCE_BYTES}s")
UNLABELLED = -1


@dataclass(frozen=True)
class SampleMeta:
    """The fixed-size record beside every payload; packs to `META_STRUCT.size` bytes."""

    label: int = UNLABELLED
    timestamp_ns: int = 0
    generation: int = 0
    source: str = ""
    index: int = 0

    def pack_into(self, buf, offset: int = 0) -> None:
        src = self.source.encode("utf-8")[:SOURCE_BYTES]
        META_STRUCT.pack_into(
            buf, offset, self.index, self.timestamp_ns, self.generation, self.label, src
        )

    def pack(self) -> bytes:
        b = bytearray(META_STRUCT.size)
        self.pack_into(b)
        return bytes(b)

    @classmethod
    def unpack_from(cls, buf, offset: int = 0) -> "SampleMeta":
        index, ts, gen, label, src = META_STRUCT.unpack_from(buf, offset)
        return cls(
            label=label,
            timestamp_ns=ts,
            generation=gen,
            source=src.rstrip(b"\0").decode("utf-8", "replace"),
            index=index,
        )


@dataclass
class Sample:
    """A decoded sample: the schema, its metadata, and arrays (views or copies)."""

    schema: SampleSchema
    meta: SampleMeta
    arrays: dict[str, np.ndarray]

    def __repr__(self) -> str:
        return f"Sample({self.schema!r}, label={self.meta.label}, gen={self.meta.generation})"
