"""Decoding the cache's H.264/HEVC clips into the batch on the GPU (NVDEC), after the copy.

On a CUDA trainer the disk loader reads compressed records with `defer_video=True`
(protocol/cache.py): their other modalities go into the pinned batch rows as usual, and their
checked video blobs ride along with the batch (`HostBatch.deferred`). `DevicePrefetcher` uploads
the rows on its side stream and then calls `decode_deferred`, which decodes each blob with NVDEC
(PyAV `hwaccel=cuda`, frames left on the GPU) and converts the NV12 surfaces to RGB straight into
the row's video on the device (trainer/layouts.py, H.264's left chroma siting, the blob's matrix
and range): the clip never exists decoded in host memory.

Fallbacks (each said once in the log): without CUDA, or with a PyAV that has no `cuda` hwaccel,
the trainer never defers (the loader threads decode on the CPU: the tested path); a blob NVDEC
refuses (a codec or size the GPU lacks) is decoded on the CPU and copied into the row. On a CPU
tensor `decode_deferred` decodes with PyAV into the row's memory (what the CPU tests run).
GPU parts: docs/gpu.md, GPU checklist.
"""
from __future__ import annotations

import logging

import av
import numpy as np
import torch

from protocol import video_store
from protocol.schema import MATRICES, RANGES, SampleSchema

from .batching import modality_views
from .layouts import yuv420_to_rgb

log = logging.getLogger(__name__)
_said: set[str] = set()


def _once(key: str, msg: str, *args) -> None:
    if key not in _said:
        _said.add(key)
        log.warning(msg, *args)


def nvdec_refusal(device: torch.device) -> str | None:
    """Why NVDEC cannot decode into batches on `device` (None: it can)."""
    if device.type != "cuda":
        return f"the trainer's device is {device}, not a CUDA GPU"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        from av.codec.hwaccel import hwdevices_available
    except ImportError:
        return "this PyAV has no hardware decoding"
    if "cuda" not in hwdevices_available():
        return f"this PyAV's FFmpeg has no cuda hwaccel (it has {', '.join(hwdevices_available())})"
    return None


class NvdecDecoder:
    """One NVDEC decoder per codec for one device, reused across clips (flushed between)."""

    def __init__(self, device: torch.device):
        from av.codec.hwaccel import HWAccel

        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._hw = HWAccel("cuda", device=str(index), allow_software_fallback=False,
                           is_hw_owned=True)
        self._contexts: dict[int, object] = {}

    def _context(self, codec: int):
        ctx = self._contexts.get(codec)
        if ctx is None:
            ctx = av.CodecContext.create(video_store._DECODERS[codec], "r", hwaccel=self._hw)
            self._contexts[codec] = ctx
        return ctx

    def decode_into(self, blob, out: torch.Tensor) -> None:
        """Decode a video blob into `out`, a uint8 (T, C, H, W) CUDA view (a batch row's)."""
        codec, pix, matrix, rng, shape, sizes, pos = video_store.blob_info(blob)
        if tuple(out.shape) != shape:
            raise video_store.VideoStoreError(f"video blob holds a {list(shape)} clip, the row "
                                              f"has {list(out.shape)}")
        t_len, _, h, w = shape
        mv = memoryview(blob).cast("B")
        ctx = self._context(codec)
        ys, uvs = [], []
        try:
            frames = []
            for n in sizes.tolist():
                frames.extend(ctx.decode(av.Packet(mv[pos: pos + n])))
                pos += n
            frames.extend(ctx.decode(None))
            ctx.flush_buffers()
            for f in frames:  # copies out of the decoder's surfaces, which it recycles
                ys.append(torch.from_dlpack(f.planes[0]).clone())
                if pix != 1:
                    uv = torch.from_dlpack(f.planes[1])
                    uvs.append(uv.reshape(uv.shape[0], -1).clone())
        except Exception:
            self._contexts.pop(codec, None)
            raise
        if len(ys) != t_len:
            raise video_store.VideoStoreError(f"NVDEC decoded {len(ys)} frames, expected {t_len}")
        y = torch.stack(ys)
        if pix == 1:  # gray: the luma plane is the clip (full range)
            out[:, 0].copy_(y[:, :h, :w])
            return
        uv = torch.stack(uvs).reshape(t_len, uvs[0].shape[0], -1, 2)
        rgb = yuv420_to_rgb(y, uv[..., 0], uv[..., 1], MATRICES[matrix], RANGES[rng],
                            siting="left")
        out.copy_(rgb[..., :h, :w])


_decoders: dict[torch.device, NvdecDecoder] = {}


def decode_deferred(schema: SampleSchema, data: torch.Tensor, deferred) -> None:
    """Decode the batch's deferred clips ((row, record, blob), from read_batch_into with
    defer_video) into the video of those rows of `data` ((B, row) uint8, host or device)."""
    video = modality_views(schema, data)[video_store.VIDEO]
    if data.device.type != "cuda":
        for row, _, blob in deferred:
            video_store.decode_video_into(blob, video[row].numpy())
        return
    dec = _decoders.get(data.device)
    if dec is None:
        dec = _decoders[data.device] = NvdecDecoder(data.device)
    for row, record, blob in deferred:
        try:
            dec.decode_into(blob, video[row])
        except Exception as e:  # NVDEC refused this clip: the CPU decodes it, the GPU gets it
            _once(f"nvdec-{type(e).__name__}", "NVDEC could not decode record %d (%s: %s); "
                  "decoding such clips on the CPU (said once)", record, type(e).__name__, e)
            host = np.empty(tuple(video[row].shape), np.uint8)
            video_store.decode_video_into(blob, host)
            video[row].copy_(torch.from_numpy(host), non_blocking=False)


__all__ = ["NvdecDecoder", "decode_deferred", "nvdec_refusal"]
