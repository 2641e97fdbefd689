"""`mmctl filter --ffmpeg CHAIN` on a running producer: a refused chain changes nothing and the
daemon goes on publishing; an accepted one is proved and makes a new generation whose samples
are the chain's frames. Real `mm-producer run` processes, a real H.264 file, real ZeroMQ."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _av_stream  # noqa: E402
from test_producer_commands import _refused, _still_publishing  # noqa: E402
from _polling import wait_for  # noqa: E402
from test_producer_daemon import Daemon, first_sample_of  # noqa: E402

from cli.mmctl import main as mmctl  # noqa: E402
from producer.synth import make_dataset  # noqa: E402


@pytest.fixture(scope="module")
def file_daemon(tmp_path_factory):
    path = tmp_path_factory.mktemp("ffc") / "cam.mp4"
    _av_stream.write(str(path), 2.0, "mp4", paced=False)   # 64x48 at 25 fps, with audio
    d = Daemon(path, "--loop", "--rate", "max", "--clip-frames", "4")
    wait_for(lambda: d.status()["published"] > 2, what="clips from the file")
    yield d
    d.stop()


@pytest.mark.parametrize("chain, filt", [
    ("movie=/etc/passwd", "movie"), ("sendcmd=f=x.cmd", "sendcmd"), ("zmq", "zmq"),
    ("drawtext=textfile=/etc/shadow", "drawtext"), ("subtitles=a.srt", "subtitles"),
    ("lut3d=file=a.cube", "lut3d"),
])
def test_a_file_or_command_filter_is_refused_and_the_daemon_keeps_publishing(file_daemon,
                                                                           chain, filt):
    message = _refused(file_daemon, "filter", ffmpeg=chain)
    assert f"filter {filt!r} is refused" in message
    assert file_daemon.status()["config"].get("ffmpeg") is None
    _still_publishing(file_daemon)


def test_a_cuda_chain_is_refused_on_a_cpu_producer_naming_the_cpu_form(file_daemon):
    message = _refused(file_daemon, "filter", ffmpeg="yadif_cuda,scale_cuda=32:24")
    assert "'yadif_cuda' runs only on CUDA frames" in message and "'yadif'" in message


def test_a_chain_ffmpeg_rejects_is_refused_before_it_runs(file_daemon):
    message = _refused(file_daemon, "filter", ffmpeg="scale=abc:def")
    assert "FFmpeg refused it" in message
    _still_publishing(file_daemon)


def test_an_accepted_chain_makes_a_new_generation_of_the_chains_frames(file_daemon):
    before = file_daemon.status()["generation"]
    reply = file_daemon.request("filter", ffmpeg="yadif,scale=32:16,hflip")
    assert reply["generation"] == before + 1
    sample = first_sample_of(file_daemon.ring, reply["generation"])
    assert sample.arrays["video"].shape == (4, 3, 16, 32)
    st = file_daemon.status()
    assert st["config"]["ffmpeg"] == "yadif,scale=32:16,hflip"
    cleared = file_daemon.request("filter", ffmpeg="none")
    assert first_sample_of(file_daemon.ring, cleared["generation"]).arrays["video"].shape == \
        (4, 3, 48, 64)


def test_mmctl_filter_ffmpeg_refuses_a_movie_chain_before_sending(file_daemon):
    r = CliRunner().invoke(mmctl, ["--json", "filter", "--ffmpeg", "movie=/etc/passwd"],
                           env={"MMFEED_RUNTIME_DIR": file_daemon.runtime})
    assert r.exit_code == 2
    assert "'movie' is refused" in json.loads(r.output)["error"]["message"]


@pytest.fixture(scope="module")
def dataset_daemon(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("ffd") / "ds", per_class={"train": 1},
                        size=(32, 24), clip_seconds=0.5, extras=False)
    d = Daemon(root, "--loop", "--rate", "max", "--clip-frames", "2")
    wait_for(lambda: d.status()["published"] > 0, what="samples")
    yield d
    d.stop()


def test_an_accepted_chain_on_a_dataset_is_proved_on_a_real_sample(dataset_daemon):
    d = dataset_daemon
    gen = d.request("filter", ffmpeg="transpose=1")["generation"]
    video = first_sample_of(d.ring, gen).arrays["video"]
    assert video.shape[1:] == (3, 32, 24)   # 32x24 frames turned a quarter
    assert d.status()["config"]["ffmpeg"] == "transpose=1"


def test_a_chain_that_cannot_make_the_datasets_samples_is_refused(dataset_daemon):
    message = _refused(dataset_daemon, "filter", ffmpeg="crop=100:100:0:0")
    assert "cannot make sample" in message
    _still_publishing(dataset_daemon)


def test_status_says_the_decoder_and_filter_backend_actually_in_use(file_daemon):
    """On this CPU-only machine: decoded on the CPU, swscale into numpy; a crop or a chain is a
    libavfilter graph (ffmpeg-cpu)."""
    st = file_daemon.status()
    assert (st["video_decode"], st["video_filters"]) == ("cpu", "numpy")
    assert "CPU" in st["video_route"]
    file_daemon.request("filter", spec="crop=32x24")
    assert file_daemon.status()["video_filters"] == "ffmpeg-cpu"
    file_daemon.request("filter", spec="none", ffmpeg="hflip")
    assert file_daemon.status()["video_filters"] == "ffmpeg-cpu"
    file_daemon.request("filter", spec="none", ffmpeg="none")
    assert file_daemon.status()["video_filters"] == "numpy"
