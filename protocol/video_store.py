"""How the disk cache holds video: raw, H.264, HEVC or NV12 (`mm-producer preprocess --video-store`).

The pipeline makes a clip as uint8 (T, C, H, W) at its target size and rate. A cache record can
hold it four ways (`STORES`; the index's `store` column says which, per record):

    store  record bytes                                    decoded by                    B/pixel
    -----  ----------------------------------------------  ----------------------------  -------
    raw    the schema payload (SampleSchema.pack)           nothing: a memcpy             3 (1 gray)
    nv12   the payload with `video` as NV12 planes          the trainer, on its device,   1.5
           (schema layout `nv12/<matrix>/<range>`)          after the host-to-device copy
    h264   the other modalities (packed by the "rest"       PyAV (libavcodec) in loader   ~0.05-0.3
    hevc   schema, see `rest_layout`), then a video blob    threads, into the batch row   (measured)

A video blob is one closed GOP: the clip's first frame is an IDR frame and nothing refers outside
the clip, so a record decodes alone (no neighbour, no seek). Blob layout (little-endian)::

    offset  size  field
    0       4     magic b"MMVS"
    4       1     blob version (1)
    5       1     codec: 1 h264, 2 hevc (the store id)
    6       1     pixel format: 0 yuv420p (an RGB clip), 1 gray (a 1-channel clip)
    7       1     matrix: 0 bt601, 1 bt709 (RGB <-> YUV; unused for gray)
    8       1     range: 0 limited, 1 full (gray is always full)
    9       3     zero
    12      2x4   T, C, H, W of the clip (odd H/W were padded by edge copy to encode; cut on decode)
    20      4     P: packets
    24      4 P   packet sizes
    ...           the packets, in decode order, back to back

WHY packets with their sizes rather than an Annex-B byte stream: decoding then needs no parser
pass over the bytes, and a corrupt size is caught before the decoder sees anything. A record
also has a CRC-32 in the index (`crc32`), checked before decoding: H.264 decoders conceal damage
rather than fail, so without it a flipped byte would train on garbage silently.

Colour: an RGB clip goes to YUV 4:2:0 and back with the same matrix and range, stated in the blob
or the layout (`StoreSettings.matrix`/`range`; default BT.601 limited: the pipeline's RGB came
from sources decoded as BT.601 limited, and the round trip through it measured 40.4 dB against
40.0 dB for full range on the demo clips, chroma subsampling included). swscale converts with
ACCURATE_RND (producer/modalities/video.py NOTE [swscale gbrp bug]).

Settings (`DEFAULT_SETTINGS`, chosen by measurement, `python -m bench.video_store --sweep`;
BENCHMARKS.md `## video store`): libx264 crf 20 preset medium, libx265 crf 22 preset medium; GOP
= the clip (one IDR, no scene cuts), B-frames as the preset has them (they decode inside the
clip), frame rate tagged 25 (x264's rate control depends on it; fixed so crf means one thing).
Measured on 8-frame clips (BENCHMARKS.md `## video store`, the sweep): real footage
(intel_car-detection.mp4) at 224x224, h264 crf 20 = 5.4 KB a clip, 224x smaller than raw, 43.9
dB PSNR (worst clip 41.9); crf 23 = 316x, 42.7 dB (40.1); crf 18 = 172x, 44.7 dB. The demo's
synthetic clips (64x48 with +-12 levels of per-pixel noise that no codec keeps): crf 20 = 31.9x,
30.5 dB (24.8). Preset veryfast made files within 5% of medium's at 0.2 dB less; decode times
differed less than the (loaded) machine's noise. hevc crf 22 = 237x, 43.6 dB on the same real
clips (x265's headers cost more on tiny clips: 22.6x on the demo's).

A compressed video is kept only when it is smaller than the raw clip (noise does not compress);
otherwise the record is stored raw and the notes say so: a cache may mix stores.

No torch here (protocol/ never imports it): the trainer's NV12 -> RGB is trainer/layouts.py.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping

import av
import numpy as np

from .errors import MmfeedError
from .schema import (MATRICES, NV12, RANGES, ModalitySpec, SampleSchema, nv12_frame_bytes,
                     parse_layout)

#: Store names, in id order: the id is what the cache index's `store` column holds.
STORES = ("raw", "h264", "hevc", "nv12")
RAW, H264, HEVC, NV12_STORE = range(4)
COMPRESSED = (H264, HEVC)
#: The model input a store applies to (the pipeline's one video input).
VIDEO = "video"

_ENCODERS = {H264: "libx264", HEVC: "libx265"}
_DECODERS = {H264: "h264", HEVC: "hevc"}
_MAGIC = b"MMVS"
_BLOB_VERSION = 1
_HEADER = struct.Struct("<4sBBBBBxxxHHHHI")
_PIX_YUV420, _PIX_GRAY = 0, 1
_COLORSPACE = {"bt601": "ITU601", "bt709": "ITU709"}
_COLOR_RANGE = {"limited": "MPEG", "full": "JPEG"}
#: swscale flags for every conversion here: ACCURATE_RND takes swscale's correct path at widths
#: that are not a multiple of 16 (see producer/modalities/video.py NOTE [swscale gbrp bug]).
_INTERP = av.video.reformatter.Interpolation.BILINEAR | av.video.reformatter.Interpolation.ACCURATE_RND


class VideoStoreError(MmfeedError):
    """A video record that cannot be encoded or decoded (bad settings, corrupt bytes)."""

    code = "video_store"


@dataclass(frozen=True)
class StoreSettings:
    """How `preprocess --video-store` holds video; part of the cache's config hash (except
    raw, so a raw cache made before stores existed is still reused)."""

    store: str = "raw"
    crf: int = 20
    preset: str = "medium"
    matrix: str = "bt601"
    range: str = "limited"

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"video store {self.store!r}: expected one of {', '.join(STORES)}")
        if self.matrix not in MATRICES:
            raise ValueError(f"video store matrix {self.matrix!r}: expected one of "
                             f"{', '.join(MATRICES)}")
        if self.range not in RANGES:
            raise ValueError(f"video store range {self.range!r}: expected one of "
                             f"{', '.join(RANGES)}")
        if isinstance(self.crf, bool) or not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise ValueError(f"video store crf {self.crf!r}: expected an int in 0..51")

    @classmethod
    def for_store(cls, store: str, **overrides) -> "StoreSettings":
        """The measured defaults of `store` (`DEFAULT_SETTINGS`), with `overrides` applied."""
        if store not in STORES:
            raise ValueError(f"video store {store!r}: expected one of {', '.join(STORES)}")
        return dataclasses.replace(DEFAULT_SETTINGS[store], **overrides)

    @property
    def store_id(self) -> int:
        return STORES.index(self.store)

    @property
    def layout(self) -> str:
        """The schema layout an nv12 store gives the video modality."""
        return f"{NV12}/{self.matrix}/{self.range}"

    def to_dict(self) -> dict:
        """What the config hash and the manifest record (only what changes the bytes)."""
        if self.store == "raw":
            return {"store": "raw"}
        if self.store == "nv12":
            return {"store": "nv12", "matrix": self.matrix, "range": self.range}
        return {"store": self.store, "encoder": _ENCODERS[self.store_id], "crf": self.crf,
                "preset": self.preset, "gop": "clip", "matrix": self.matrix, "range": self.range}


DEFAULT_SETTINGS = {
    "raw": StoreSettings("raw"),
    "nv12": StoreSettings("nv12"),
    "h264": StoreSettings("h264", crf=20, preset="medium"),
    "hevc": StoreSettings("hevc", crf=22, preset="medium"),
}


# --- colour ------------------------------------------------------------------------------------


def _frame_rgb(clip: np.ndarray, t: int) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(clip[t].transpose(1, 2, 0)),
                                      format="rgb24")


def _plane_rows(plane, rows: int, width_bytes: int) -> np.ndarray:
    """A (rows, width_bytes) view of a frame plane (its lines may be padded)."""
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:rows, :width_bytes]


def to_nv12(clip: np.ndarray, matrix: str = "bt601", color_range: str = "limited") -> np.ndarray:
    """uint8 RGB (..., 3, H, W) -> uint8 NV12 planes (..., nv12_frame_bytes(H, W)), by swscale."""
    h, w = clip.shape[-2:]
    lead = clip.shape[:-3]
    frames = clip.reshape(-1, 3, h, w)
    ch, cw = (h + 1) // 2, (w + 1) // 2
    out = np.empty((len(frames), nv12_frame_bytes(h, w)), np.uint8)
    for t in range(len(frames)):
        f = _frame_rgb(frames, t).reformat(format="nv12", dst_colorspace=_COLORSPACE[matrix],
                                           dst_color_range=_COLOR_RANGE[color_range],
                                           interpolation=_INTERP, threads=1)
        out[t, : h * w].reshape(h, w)[:] = _plane_rows(f.planes[0], h, w)
        out[t, h * w:].reshape(ch, 2 * cw)[:] = _plane_rows(f.planes[1], ch, 2 * cw)
    return out.reshape(*lead, out.shape[-1])


def pictured(arrays: Mapping[str, np.ndarray], schema: SampleSchema | None = None
             ) -> dict[str, np.ndarray]:
    """The arrays a preview draws: packed modalities (NV12 planes from the nv12 store or
    `pixel_format=yuv420`) as their uint8 RGB clip by swscale, the rest as they are. The
    layout comes from `schema` or from the array itself (a PackedArray); chroma siting is
    ignored (a quarter-pixel of chroma is invisible in a preview)."""
    out = dict(arrays)
    for name, a in arrays.items():
        spec = schema.spec(name) if schema is not None and name in schema else None
        layout = spec.layout if spec is not None else getattr(a, "mm_layout", "")
        if not layout:
            continue
        shape = spec.shape if spec is not None else a.mm_shape
        _, matrix, color_range = parse_layout(layout)
        planes = np.asarray(a).reshape(-1, np.asarray(a).shape[-1])
        rgb = nv12_to_rgb_swscale(planes, shape[-2], shape[-1], matrix, color_range)
        out[name] = rgb.reshape(shape)
    return out


def nv12_to_rgb_swscale(planes: np.ndarray, height: int, width: int, matrix: str = "bt601",
                        color_range: str = "limited") -> np.ndarray:
    """NV12 planes (N, bytes) -> uint8 RGB (N, 3, H, W) by swscale: the CPU reference the
    trainer's torch conversion (trainer/layouts.py) is tested against."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    out = np.empty((len(planes), 3, height, width), np.uint8)
    for t, p in enumerate(planes):
        f = av.VideoFrame(width, height, "nv12")
        _plane_rows(f.planes[0], height, width)[:] = p[: height * width].reshape(height, width)
        _plane_rows(f.planes[1], ch, 2 * cw)[:] = p[height * width:].reshape(ch, 2 * cw)
        g = f.reformat(format="gbrp", src_colorspace=_COLORSPACE[matrix],
                       src_color_range=_COLOR_RANGE[color_range], interpolation=_INTERP,
                       threads=1)
        for c, k in enumerate((2, 0, 1)):  # gbrp planes are G, B, R
            out[t, c] = _plane_rows(g.planes[k], height, width)
    return out


# --- encoding --------------------------------------------------------------------------------


def _even(n: int) -> int:
    return n + (n & 1)


def encode_video(clip: np.ndarray, settings: StoreSettings) -> bytes:
    """uint8 (T, C, H, W), C 1 or 3 -> a video blob (module docstring) of one closed GOP."""
    if settings.store_id not in COMPRESSED:
        raise ValueError(f"encode_video: store {settings.store!r} is not a codec")
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[1] not in (1, 3):
        raise VideoStoreError(f"video store {settings.store}: expected a uint8 clip "
                              f"(T, 1|3, H, W), got {clip.dtype}{list(clip.shape)}")
    t_len, c, h, w = clip.shape
    gray = c == 1
    eh, ew = _even(h), _even(w)
    if (eh, ew) != (h, w):  # 4:2:0 needs even sides: pad by repeating the last row/column
        clip = np.pad(clip, ((0, 0), (0, 0), (0, eh - h), (0, ew - w)), mode="edge")
    ctx = av.CodecContext.create(_ENCODERS[settings.store_id], "w")
    ctx.width, ctx.height = ew, eh
    ctx.pix_fmt = "gray" if gray else "yuv420p"
    ctx.time_base = Fraction(1, 25)
    ctx.framerate = Fraction(25)
    ctx.gop_size = t_len
    ctx.thread_count = 1  # bytes depend only on the frames (and preprocess runs a process per core)
    rng = "full" if gray else settings.range
    ctx.color_range = av.video.reformatter.ColorRange[_COLOR_RANGE[rng]]
    ctx.colorspace = av.video.reformatter.Colorspace[_COLORSPACE[settings.matrix]]
    gop = f"keyint={t_len}:min-keyint={t_len}:scenecut=0"
    if settings.store_id == H264:
        ctx.options = {"crf": str(settings.crf), "preset": settings.preset, "x264-params": gop}
    else:
        ctx.options = {"crf": str(settings.crf), "preset": settings.preset,
                       "x265-params": f"{gop}:log-level=error"}
    packets: list[bytes] = []
    for t in range(t_len):
        if gray:
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(clip[t, 0]), format="gray")
        else:
            f = _frame_rgb(clip, t).reformat(format="yuv420p",
                                             dst_colorspace=_COLORSPACE[settings.matrix],
                                             dst_color_range=_COLOR_RANGE[settings.range],
                                             interpolation=_INTERP, threads=1)
        f.pts = t
        packets.extend(bytes(p) for p in ctx.encode(f))
    packets.extend(bytes(p) for p in ctx.encode(None))
    header = _HEADER.pack(_MAGIC, _BLOB_VERSION, settings.store_id,
                          _PIX_GRAY if gray else _PIX_YUV420, MATRICES.index(settings.matrix),
                          RANGES.index(rng), t_len, c, h, w, len(packets))
    sizes = struct.pack(f"<{len(packets)}I", *(len(p) for p in packets))
    return header + sizes + b"".join(packets)


# --- decoding --------------------------------------------------------------------------------

_local = threading.local()


def _decoder(codec: int):
    """This thread's decoder for `codec` (reused: making one costs ~0.1 ms, a small clip's
    decode ~1 ms); rebuilt in a forked child and after any error."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.pid, _local.decoders = pid, {}
        _local.reformatter = av.video.reformatter.VideoReformatter()
    ctx = _local.decoders.get(codec)
    if ctx is None:
        ctx = av.CodecContext.create(_DECODERS[codec], "r")
        ctx.thread_count = 1  # parallel across records (loader threads), not inside one clip
        _local.decoders[codec] = ctx
    return ctx


def blob_info(blob) -> tuple[int, int, int, int, tuple[int, int, int, int], np.ndarray, int]:
    """(codec, pixel format, matrix, range, (T, C, H, W), packet sizes, data offset), checked."""
    mv = memoryview(blob).cast("B")
    if len(mv) < _HEADER.size:
        raise VideoStoreError(f"video blob of {len(mv)} bytes is shorter than its "
                              f"{_HEADER.size}-byte header")
    magic, version, codec, pix, matrix, rng, t, c, h, w, n = _HEADER.unpack_from(mv)
    if magic != _MAGIC or version != _BLOB_VERSION:
        raise VideoStoreError(f"video blob: expected magic {_MAGIC!r} version {_BLOB_VERSION}, "
                              f"found {bytes(magic)!r} version {version}")
    if codec not in COMPRESSED or pix > _PIX_GRAY or matrix >= len(MATRICES) or rng >= len(RANGES):
        raise VideoStoreError(f"video blob: unknown codec/format/matrix/range "
                              f"{codec}/{pix}/{matrix}/{rng}")
    data = _HEADER.size + 4 * n
    if len(mv) < data:
        raise VideoStoreError(f"video blob: {n} packet sizes do not fit in {len(mv)} bytes")
    sizes = np.frombuffer(mv, "<u4", n, _HEADER.size)
    if int(sizes.sum(dtype=np.uint64)) != len(mv) - data:
        raise VideoStoreError(f"video blob: packets add up to {int(sizes.sum(dtype=np.uint64))} "
                              f"bytes, the blob holds {len(mv) - data}")
    return codec, pix, matrix, rng, (t, c, h, w), sizes, data


def decode_video_into(blob, out: np.ndarray) -> None:
    """Decode a video blob into `out`, a writable uint8 (T, C, H, W) view (a batch row's video).

    Frames are converted by swscale (RGB) or taken from the luma plane (gray) and copied into
    `out` one plane at a time: no per-pixel Python, no full-size intermediate arrays. Raises
    VideoStoreError when the blob does not decode to exactly `out`'s shape."""
    codec, pix, matrix, rng, shape, sizes, pos = blob_info(blob)
    if tuple(out.shape) != shape:
        raise VideoStoreError(f"video blob holds a {list(shape)} clip, the schema says "
                              f"{list(out.shape)}")
    t_len, c, h, w = shape
    if (c == 1) != (pix == _PIX_GRAY):
        raise VideoStoreError(f"video blob: pixel format {pix} does not fit {c} channel(s)")
    mv = memoryview(blob).cast("B")
    ctx = _decoder(codec)
    k = 0
    try:
        def put(frames) -> None:
            nonlocal k
            for f in frames:
                if k >= t_len:
                    raise VideoStoreError(f"video blob decodes to more than {t_len} frames")
                if f.width < w or f.height < h:
                    raise VideoStoreError(f"video blob frame {k} is {f.width}x{f.height}, "
                                          f"expected {w}x{h}")
                if pix == _PIX_GRAY:
                    out[k, 0] = _plane_rows(f.planes[0], h, w)
                else:
                    g = _local.reformatter.reformat(
                        f, format="gbrp", src_colorspace=_COLORSPACE[MATRICES[matrix]],
                        src_color_range=_COLOR_RANGE[RANGES[rng]], interpolation=_INTERP,
                        threads=1)
                    for ch, p in enumerate((2, 0, 1)):  # gbrp planes are G, B, R
                        out[k, ch] = _plane_rows(g.planes[p], h, w)
                k += 1

        for n in sizes.tolist():
            put(ctx.decode(av.Packet(mv[pos: pos + n])))
            pos += n
        put(ctx.decode(None))
        ctx.flush_buffers()
    except VideoStoreError:
        _local.decoders.pop(codec, None)
        raise
    except (av.FFmpegError, ValueError) as e:
        _local.decoders.pop(codec, None)  # never reuse a decoder in an unknown state
        raise VideoStoreError(f"video blob: {type(e).__name__} after {k} frames: {e}") from None
    if k != t_len:
        _local.decoders.pop(codec, None)
        raise VideoStoreError(f"video blob decodes to {k} frames, expected {t_len}")


# --- records ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def rest_layout(schema: SampleSchema) -> tuple[SampleSchema | None, int]:
    """(schema of the modalities other than video, offset of the video blob) of a compressed
    record of `schema`: the rest is packed first, the blob starts 64-aligned after it."""
    rest = tuple(m for m in schema.modalities if m.name != VIDEO)
    if not rest:
        return None, 0
    rs = SampleSchema(rest)
    return rs, (rs.payload_nbytes + 63) // 64 * 64


def _video_spec(schema: SampleSchema) -> ModalitySpec | None:
    return schema.spec(VIDEO) if VIDEO in schema else None


def encode_record(schema: SampleSchema, arrays: Mapping[str, np.ndarray],
                  settings: StoreSettings, notes: list[str] | None = None
                  ) -> tuple[SampleSchema, bytes | bytearray]:
    """A sample's arrays -> (the schema the cache records it under, the record's bytes).

    raw: (schema, schema.pack(arrays)). nv12: the video as NV12 planes under a layout-tagged
    schema. h264/hevc: the rest then the video blob, under `schema` itself (what it decodes
    to). A sample the store cannot apply to (no video, gray for nv12) or whose compressed video
    would not be smaller than the raw clip is stored raw, with a note saying why."""
    spec = _video_spec(schema)
    store = settings.store_id
    if store == RAW:
        return schema, schema.pack(arrays)
    if spec is None:
        return schema, schema.pack(arrays)  # nothing to store differently: no video input
    if spec.layout:  # pixel_format=yuv420: the video already is NV12 planes
        if notes is not None:
            notes.append(f"video store {settings.store}: the video is already {spec.layout} "
                         f"planes (pixel_format=yuv420); stored as they are")
        return schema, schema.pack(arrays)
    if spec.dtype != "uint8" or len(spec.shape) != 4 or spec.shape[1] not in (1, 3):
        if notes is not None:
            notes.append(f"video store {settings.store}: video is {spec.dtype}"
                         f"{list(spec.shape)}, not a uint8 (T, C, H, W) clip; stored raw")
        return schema, schema.pack(arrays)
    if store == NV12_STORE:
        if spec.shape[1] != 3:
            if notes is not None:
                notes.append("video store nv12: the clip is gray (1 channel), already 1 "
                             "byte a pixel; stored raw")
            return schema, schema.pack(arrays)
        packed = SampleSchema(tuple(
            ModalitySpec(m.name, m.dtype, m.shape, settings.layout) if m.name == VIDEO else m
            for m in schema.modalities))
        planes = to_nv12(np.asarray(arrays[VIDEO]), settings.matrix, settings.range)
        return packed, packed.pack({**arrays, VIDEO: planes})
    schema.check(arrays)
    blob = encode_video(np.asarray(arrays[VIDEO]), settings)
    if len(blob) >= spec.nbytes:
        if notes is not None:
            notes.append(f"video store {settings.store}: the encoded clip ({len(blob)} bytes) "
                         f"is not smaller than the raw clip ({spec.nbytes}); stored raw")
        return schema, schema.pack(arrays)
    rest, off = rest_layout(schema)
    out = bytearray(off + len(blob))
    if rest is not None:
        rest.pack_into({k: v for k, v in arrays.items() if k != VIDEO}, out)
    out[off:] = blob
    return schema, out


def store_of_record(schema: SampleSchema, payload) -> int:
    """Which store a record's bytes are (the writer's check; module docstring): a packed
    layout is nv12, the schema's exact size raw, anything smaller a compressed record whose
    blob header must name its codec. VideoStoreError when it is none of them."""
    n = memoryview(payload).nbytes
    if schema.packed:
        if n != schema.payload_nbytes:
            raise VideoStoreError(f"an nv12 record of {n} bytes, its schema packs to "
                                  f"{schema.payload_nbytes}")
        return NV12_STORE
    if n == schema.payload_nbytes:
        return RAW
    spec = _video_spec(schema)
    if spec is None or n > schema.payload_nbytes:
        raise VideoStoreError(f"a record of {n} bytes: its schema {schema!r} packs to "
                              f"{schema.payload_nbytes} and has no video to compress")
    _, off = rest_layout(schema)
    codec, _, _, _, shape, _, _ = blob_info(memoryview(payload).cast("B")[off:])
    if shape != spec.shape:
        raise VideoStoreError(f"video blob holds a {list(shape)} clip, the schema says "
                              f"{list(spec.shape)}")
    return codec


def record_crc(payload) -> int:
    """CRC-32 of a record's bytes (kept in the index for compressed records)."""
    return zlib.crc32(payload) & 0xFFFFFFFF


def copy_rest_into(schema: SampleSchema, record, out_row: np.ndarray) -> np.ndarray:
    """Copy a compressed record's other modalities to their places in `out_row`; returns the
    video blob (a view of `record`), for a decoder elsewhere (the GPU's)."""
    rec = np.frombuffer(record, np.uint8) if not isinstance(record, np.ndarray) else record
    rest, off = rest_layout(schema)
    if rest is not None:
        views = schema.views(out_row)
        for name, a in rest.views(rec[: rest.payload_nbytes]).items():
            np.copyto(views[name], a)
    return rec[off:]


def decode_record_into(schema: SampleSchema, record, out_row: np.ndarray) -> None:
    """A compressed record's bytes -> the schema payload in `out_row` (uint8, >= payload bytes):
    the rest's modalities copied to their places, the video decoded into its place."""
    blob = copy_rest_into(schema, record, out_row)
    decode_video_into(blob, schema.views(out_row)[VIDEO])


__all__ = ["COMPRESSED", "DEFAULT_SETTINGS", "H264", "HEVC", "NV12_STORE", "RAW", "STORES",
           "StoreSettings", "VIDEO", "VideoStoreError", "blob_info", "copy_rest_into",
           "decode_record_into",
           "decode_video_into", "encode_record", "encode_video", "nv12_to_rgb_swscale", "pictured",
           "record_crc", "rest_layout", "store_of_record", "to_nv12"]
