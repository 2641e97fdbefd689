"""protocol/preview.py and `mm-producer preview`: one sample drawn, every modality, captioned."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from producer.cli import main as producer_cli
from producer.preprocess import run_preprocess
from producer.pipeline import PipelineConfig
from protocol.preview import MAX_FRAMES, decode_sample, encode_sample, render_png

INFO = {"generation": 7, "filter": "gray", "sensors": {"lidar": "lidar_top"},
        "methods": {"radar": "range_azimuth"}, "source": "cam@1.00s", "label": -1}


def _sample(rng):
    return {
        "video": rng.integers(0, 255, (8, 1, 48, 64), dtype=np.uint8),
        "audio": rng.standard_normal((1, 64, 101)).astype(np.float32),
        "lidar": rng.random((3, 160, 160), dtype=np.float32),
        "radar": rng.random((1, 64, 64), dtype=np.float32),
        "imu": rng.standard_normal((50, 6)).astype(np.float32),
    }


def test_every_modality_gets_a_panel_and_the_png_carries_the_caption(tmp_path):
    arrays = _sample(np.random.default_rng(0))
    reply = json.loads(json.dumps(encode_sample(arrays, INFO)))  # what crosses the wire
    res = render_png(decode_sample(reply), reply, tmp_path / "p.png")
    img = Image.open(tmp_path / "p.png")
    assert img.size == (res["width"], res["height"]) and img.format == "PNG"
    assert [p["name"] for p in res["panels"]] == list(arrays)
    caption = img.text["Caption"].splitlines()
    assert caption[0] == ("generation 7, filter gray, sensors lidar=lidar_top, method radar "
                          "range_azimuth")
    assert caption[1] == "source cam@1.00s, unlabelled"
    pixels = np.asarray(img.convert("RGB"))
    for p in json.loads(img.text["Panels"]):
        x0, y0, x1, y1 = p["box"]
        assert x1 - x0 >= 32 and y1 - y0 >= 32, p
        assert pixels[y0:y1, x0:x1].std() > 0, f"{p['name']} panel is blank"


def test_a_clip_is_shown_as_a_few_frames_spread_over_it():
    arrays = {"video": np.zeros((16, 3, 8, 8), np.uint8)}
    (m,) = decode_sample(encode_sample(arrays, {}))
    assert m.shape == (16, 3, 8, 8) and m.array.shape == (MAX_FRAMES, 3, 8, 8)
    assert m.note == "frames 0, 5, 10, 15 of 16"


def test_a_large_plane_is_thinned_to_fit_a_control_reply():
    arrays = {name: np.ones((3, 1024, 1024), np.float32) for name in ("a", "b")}
    reply = encode_sample(arrays, {})
    assert len(json.dumps(reply)) < 1 << 20  # control.MAX_REPLY_BYTES
    assert all(m["sent_shape"][1] < 1024 and "every" in m["note"] for m in reply["modalities"])


def test_a_preview_whose_bytes_do_not_add_up_is_refused_naming_the_modality():
    reply = encode_sample({"radar": np.zeros((1, 8, 8), np.float32)}, {})
    reply["modalities"][0]["sent_shape"] = [1, 9, 9]
    with pytest.raises(ValueError, match="radar"):
        decode_sample(reply)


def test_mm_producer_preview_draws_a_cached_sample_with_its_preprocess_settings(synth_dataset,
                                                                                  tmp_path):
    cache = tmp_path / "cache"
    run_preprocess(synth_dataset, cache, PipelineConfig(filter="gray"), splits=["val"],
                   workers=0, progress=False)
    out = tmp_path / "cached.png"
    r = CliRunner().invoke(producer_cli, ["preview", str(cache), "--index", "1", "--out",
                                          str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.splitlines()[-1])
    assert Image.open(out).size == (res["width"], res["height"])
    assert res["caption"][0].startswith("generation 0, filter gray")
    assert "split val" in res["caption"][1] and "label " in res["caption"][1]
    assert {p["name"] for p in res["panels"]} >= {"video", "audio", "lidar", "radar"}


def test_mm_producer_preview_past_the_last_record_is_a_usage_error(synth_dataset, tmp_path):
    cache = tmp_path / "cache"
    run_preprocess(synth_dataset, cache, PipelineConfig(), splits=["val"], workers=0,
                   progress=False)
    r = CliRunner().invoke(producer_cli, ["preview", str(cache), "--index", "999"])
    assert r.exit_code == 2 and "records" in r.output
