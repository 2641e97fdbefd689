"""trainer/nvdec.py: compressed clips decoded into the batch after the copy. The colour maths of
the GPU path and the deferred-decode plumbing run here on the CPU (the fallback a CPU trainer
takes is the loader threads' decode, tests/test_cache_video.py); NVDEC itself is checked on a
GPU (docs/gpu.md, GPU checklist) and skips here saying why."""
from __future__ import annotations


import av
import numpy as np
import pytest
import torch

from producer.modalities import video
from producer.pipeline import PipelineConfig
from producer.preprocess import run_preprocess
from producer.synth import REAL_DIR
from protocol import video_store as vs
from protocol.cache import CacheReader
from protocol.filters import FilterSpec
from trainer.layouts import yuv420_to_rgb
from trainer.nvdec import NvdecDecoder, nvdec_refusal
from trainer.prefetch import DevicePrefetcher, DiskLoader

CAR = REAL_DIR / "intel_car-detection.mp4"  # $MMFEED_REAL_DATA (producer/synth.py)
NO_NVDEC = nvdec_refusal(torch.device("cuda"))


def clip(synth_dataset, spec: str = "resize=225x127") -> np.ndarray:
    if CAR.exists():
        return video.decode_clip(CAR, FilterSpec.parse(spec), 4, segment=(1.0, 3.0))
    path = next(iter(sorted(synth_dataset.glob("train/*/*/video.mp4"))))
    return video.decode_clip(path, FilterSpec.parse("resize=63x47"), 4)


def software_planes(blob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The yuv420p planes a decoder hands out for a blob (what NVDEC's surfaces hold)."""
    _, _, _, _, _, sizes, pos = vs.blob_info(blob)
    ctx = av.CodecContext.create("h264", "r")
    mv = memoryview(blob)
    frames = []
    for n in sizes.tolist():
        frames += ctx.decode(av.Packet(mv[pos: pos + n]))
        pos += n
    frames += ctx.decode(None)

    def plane(p, h, w):
        return torch.from_numpy(np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:h, :w].copy())

    h, w = frames[0].height, frames[0].width
    return (torch.stack([plane(f.planes[0], h, w) for f in frames]),
            torch.stack([plane(f.planes[1], h // 2, w // 2) for f in frames]),
            torch.stack([plane(f.planes[2], h // 2, w // 2) for f in frames]))


@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
@pytest.mark.parametrize("color_range", ["limited", "full"])
def test_the_gpu_paths_colour_conversion_of_decoded_frames_equals_the_cpu_decode(
        synth_dataset, matrix, color_range):
    c = clip(synth_dataset)
    blob = vs.encode_video(c, vs.StoreSettings.for_store("h264", matrix=matrix,
                                                         range=color_range))
    ref = np.empty_like(c)
    vs.decode_video_into(blob, ref)  # the loader threads' decode (swscale)
    y, u, v = software_planes(blob)
    got = yuv420_to_rgb(y, u, v, matrix, color_range, siting="left")
    got = got[..., : c.shape[2], : c.shape[3]].numpy().astype(np.int16)
    assert np.abs(got - ref).max() <= 1 and np.abs(got - ref).mean() < 0.02


def test_deferred_clips_decoded_after_the_copy_equal_the_loader_threads_decode(
        synth_dataset, tmp_path):
    cache = tmp_path / "c"
    run_preprocess(synth_dataset, cache, PipelineConfig(video_store="h264"), splits=["train"],
                   workers=0, progress=False)
    reader = CacheReader(cache, "train")
    got = {}
    for defer in (False, True):
        loader = DiskLoader(reader, 4, shuffle=False, epochs=1, pin=False,
                            defer_video=defer).start()
        pf = DevicePrefetcher(loader.get, torch.device("cpu"))
        rows = []
        try:
            while (b := pf.get(10.0)) is not None:
                if defer:
                    assert len(b.host.deferred) == b.n  # every clip was left to this step
                rows.append(b.inputs["video"].clone())
                b.release()
        finally:
            pf.close()
            loader.close()
        got[defer] = torch.cat(rows)
    assert torch.equal(got[False], got[True]) and len(got[True]) == len(reader)


def test_without_nvdec_the_refusal_says_why():
    assert "not a CUDA GPU" in nvdec_refusal(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert NO_NVDEC == "torch sees no CUDA GPU"


@pytest.mark.skipif(NO_NVDEC is not None, reason=f"NVDEC decode into the batch: {NO_NVDEC}")
def test_nvdec_decodes_a_cached_clip_into_a_cuda_row_like_the_cpu(synth_dataset):
    c = clip(synth_dataset, "resize=1920x1080")
    for store in ("h264", "hevc"):
        blob = vs.encode_video(c, vs.StoreSettings.for_store(store))
        ref = np.empty_like(c)
        vs.decode_video_into(blob, ref)
        out = torch.zeros(c.shape, dtype=torch.uint8, device="cuda")
        NvdecDecoder(torch.device("cuda")).decode_into(blob, out)
        diff = (out.cpu().int() - torch.from_numpy(ref).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.1, store


@pytest.mark.skipif(NO_NVDEC is not None, reason=f"NVDEC decode into the batch: {NO_NVDEC}")
def test_a_cuda_trainer_defers_compressed_clips_to_nvdec(synth_dataset, tmp_path):
    from trainer.loop import Trainer, TrainConfig

    cache = tmp_path / "c"
    run_preprocess(synth_dataset, cache, PipelineConfig(video_store="h264"), workers=0,
                   progress=False)
    tr = Trainer(TrainConfig(cache=cache, batch_size=4, steps=3, device="cuda",
                             checkpoint_dir=tmp_path / "ck"))
    try:
        assert tr.disk.defer_video
        while tr.step < 3:
            assert tr.step_once(timeout=30.0)
        assert tr.evaluate() is not None
    finally:
        tr.close()
