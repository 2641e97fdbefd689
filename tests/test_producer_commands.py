"""What `mm-producer run` does with commands that cannot apply to its source, and with a live
source that is paused, ends or is restarted: real processes, a real H.264 file and a real
stream on loopback (tests/_av_stream.py), real ZeroMQ and shared memory.

Each behaviour here was broken once (issue 12): a segment that ended a live stream for good,
a `resume` that said ok while finished, a paused stream publishing seconds of stale backlog,
generations starting at 1 again after a restart, commands accepted and silently ignored or
crashing later. Every wait polls a condition with a deadline.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _av_stream  # noqa: E402
from _polling import wait_for  # noqa: E402
from test_producer_daemon import (ROOT, Daemon, _clip_start, _unique,  # noqa: E402
                                  first_sample_of)

from cli.mmctl import main as mmctl  # noqa: E402
from producer.synth import make_dataset  # noqa: E402
from protocol.errors import RemoteError  # noqa: E402
from protocol.ring import RingReader  # noqa: E402

FILE_S = 4.0           # the recording: 4 s of 64x48 H.264 at 25 fps with AAC audio
CLIP_S = 4 / _av_stream.FPS   # --clip-frames 4


def _refused(d: Daemon, cmd: str, code: str = "bad_argument", **args) -> str:
    """The message of a refusal; the generation is unchanged by it."""
    before = d.status()["generation"]
    with pytest.raises(RemoteError) as e:
        d.request(cmd, **args)
    assert e.value.code == code, (e.value.code, str(e.value))
    assert d.status()["generation"] == before
    return str(e.value)


def _still_publishing(d: Daemon) -> None:
    n = d.status()["published"]
    wait_for(lambda: (s := d.status())["published"] > n and s["state"] == "running",
             what="samples to keep coming")


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "cam.mp4"
    _av_stream.write(str(path), FILE_S, "mp4", paced=False)
    return path


@pytest.fixture(scope="module")
def file_daemon(recording):
    d = Daemon(recording, "--loop", "--rate", "max", "--clip-frames", "4")
    wait_for(lambda: d.status()["published"] > 2, what="clips from the file")
    yield d
    d.stop()


class _Stream:
    """A paced stream on loopback (listen=1: one client) and the daemon reading it."""

    def __init__(self, *args: str, seconds: float = 600):
        self.port = _av_stream.free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.writer = _av_stream.spawn(self.url + "?listen=1", seconds=seconds)
        self.daemon = None
        try:
            wait_for(lambda: _av_stream.listening(self.port), what="the stream server")
            self.daemon = Daemon(self.url, "--clip-frames", "4", "--rate", "max",
                                 "--read-timeout", "5", *args)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        self.writer.kill()
        self.writer.wait()
        self.writer.stderr.close()


@pytest.fixture(scope="module")
def stream():
    s = _Stream()
    try:
        first_sample_of(s.daemon.ring, 1)
        yield s
    finally:
        s.close()


# --- live streams: segments, pause, the end of a stream ---------------------------------------


def test_segment_on_a_live_stream_is_refused_naming_the_stream_and_it_keeps_publishing(stream):
    d = stream.daemon
    msg = _refused(d, "segment", start=1.0, end=3.0)
    assert "live stream" in msg and stream.url in msg and "pause" in msg, msg
    _still_publishing(d)
    assert d.status()["config"]["segment"] is None


def test_segment_clear_with_no_segment_set_changes_nothing_and_says_so(stream):
    d = stream.daemon
    before = d.status()["generation"]
    reply = d.request("segment_clear")
    assert reply["changed"] is False and reply["generation"] == before
    _still_publishing(d)


def test_crop_larger_than_the_streams_frame_is_refused_naming_the_frame_size(stream):
    msg = _refused(stream.daemon, "filter", spec="crop=2000x2000")
    assert "64x48" in msg and stream.url in msg, msg
    msg = _refused(stream.daemon, "filter", spec="crop=32x32+40+0")
    assert "reaches past the edge of the 64x48 frame" in msg, msg
    assert stream.daemon.status()["frame_size"] == [64, 48]


def test_radar_commands_on_a_source_without_radar_are_refused_naming_its_inputs(stream):
    for cmd, args in (("method", {"input": "radar", "name": "range_azimuth"}),
                      ("sensor", {"input": "radar", "stem": "radar"})):
        msg = _refused(stream.daemon, cmd, **args)
        assert "has no radar input" in msg and "video, audio" in msg, msg


def _resume_and_read_the_next_sample(d):
    """Resume the paused daemon `d` and receive its next sample: (the sample or None, its
    age in seconds when it arrived, by its timestamp)."""
    with RingReader.attach(d.ring, start="next") as reader:
        d.request("resume")
        first = reader.receive(timeout=20)
        received_ns = time.time_ns()
    if first is None:
        return None, float("nan")
    return first, (received_ns - first.meta.timestamp_ns) / 1e9


def test_a_paused_stream_drops_what_arrives_and_resumes_at_the_present(stream):
    d = stream.daemon
    first_sample_of(d.ring, 1)
    reply = d.request("pause")
    paused_at = time.monotonic()
    assert reply["state"] == "paused" and "dropped" in reply["note"]
    try:
        # The sender goes on at 25 frames/s: 15 clips of 0.16 s are 2.4 s of stream that
        # arrive while paused. They are read and dropped, and counted.
        # (and at least 2 s of pause: on a loaded machine a backlog queued before the pause
        # can be dropped at once, and a pause of a few ms could not tell stale from present)
        st = wait_for(lambda: (s := d.status())["dropped_while_paused"] >= 15
                      and time.monotonic() - paused_at >= 2.0 and s,
                      what="clips dropped while paused")
        assert st["state"] == "paused" and "dropped" in st["idle_reason"]
        assert st["published"] == d.status()["published"]  # nothing published meanwhile
    finally:
        first, age_s = _resume_and_read_the_next_sample(d)
    paused_s = time.monotonic() - paused_at
    assert first is not None
    # A stale backlog would be stamped at the start of the pause, paused_s ago; the present
    # is one clip (0.16 s) plus decoding ago. Half the pause tells them apart on any machine.
    # (Nor in the future: stamps anchored on a late first clip ran ~1 s ahead of the clock.)
    assert abs(age_s) < paused_s / 2, (age_s, paused_s)
    assert d.status()["state"] == "running"


def _ffmpeg_udp_sender(url: str) -> subprocess.Popen:
    """The issue's own sender: the ffmpeg command line pushing MPEG-TS over UDP in real time
    (-re), a 64x48 test pattern and a tone, whether anyone listens or not."""
    return subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re",
         "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25",
         "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000",
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
         "-c:a", "aac", "-f", "mpegts", url + "?pkt_size=1316"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command line is not "
                    "installed (apt-get install ffmpeg)")
def test_a_paused_udp_stream_from_the_ffmpeg_command_line_resumes_at_the_present():
    url = f"udp://127.0.0.1:{_av_stream.free_port()}"
    sender = _ffmpeg_udp_sender(url)
    d = None
    try:
        d = Daemon(url, "--clip-frames", "4", "--rate", "max", "--read-timeout", "5")
        first_sample_of(d.ring, 1)
        d.request("pause")
        paused_at = time.monotonic()
        wait_for(lambda: d.status()["dropped_while_paused"] >= 15, what="clips dropped")
        first, age_s = _resume_and_read_the_next_sample(d)
        paused_s = time.monotonic() - paused_at
        assert first is not None
        assert abs(age_s) < paused_s / 2, (age_s, paused_s)
    finally:
        if d is not None:
            d.stop()
        sender.kill()
        sender.wait()
        sender.stderr.close()


def test_the_end_of_a_stream_is_a_source_error_retried_not_the_end_of_the_producer():
    s = _Stream(seconds=1.5)  # the sender stops after 1.5 s and closes the connection
    try:
        d = s.daemon
        st = wait_for(lambda: (x := d.status())["state"] == "source-error" and x,
                      what="source-error after the stream ended")
        assert "ended" in st["last_error"] and st["idle_reason"].startswith("the source failed")
        s.writer.wait(timeout=30)
        s.writer.stderr.close()
        # The same sender comes back: the producer reconnects by itself (back-off).
        s.writer = _av_stream.spawn(s.url + "?listen=1", seconds=600)
        n = d.status()["published"]
        wait_for(lambda: (x := d.status())["state"] == "running" and x["published"] > n,
                 timeout=60, what="samples from the restarted stream")
        assert d.request("resume")["state"] == "running"  # never "finished"
    finally:
        s.close()


def test_stream_with_a_very_low_frame_rate_says_in_status_why_nothing_is_published(stream):
    d = stream.daemon
    gen = d.request("filter", spec="fps=0.1")["generation"]  # 4 frames: one clip per 40 s
    try:
        st = wait_for(lambda: (x := d.status())["idle_reason"] and x, timeout=60,
                      what="an idle reason")
        assert st["state"] == "running"
        assert "one every 40.0 s" in st["idle_reason"], st["idle_reason"]
    finally:
        after = d.request("filter", spec="none")["generation"]
    assert after > gen
    first_sample_of(d.ring, after)


# --- files: segments, the end, refusals naming what the file has ------------------------------


def test_segment_past_the_end_of_a_file_is_refused_naming_its_duration(file_daemon):
    msg = _refused(file_daemon, "segment", start=10.0, end=12.0)
    assert "lasts 4.00 s" in msg and "cam.mp4" in msg, msg
    _still_publishing(file_daemon)


def test_fps_so_low_that_no_clip_fits_is_refused(file_daemon):
    msg = _refused(file_daemon, "filter", spec="fps=1e-300")
    assert "0.01 to 1000 frames/s" in msg, msg
    # a legal rate at which 4 frames span 6 s of a 4 s file: no sample could ever be made
    msg = _refused(file_daemon, "filter", spec="fps=0.5")
    assert "spans 6.00 s" in msg and "lasts 4.00 s" in msg, msg
    _still_publishing(file_daemon)


def test_crop_larger_than_the_files_frame_is_refused_naming_the_frame_size(file_daemon):
    msg = _refused(file_daemon, "filter", spec="crop=2000x2000")
    assert "larger than the 64x48 frame" in msg and "cam.mp4" in msg, msg


def test_label_beyond_int32_is_refused_when_the_source_has_no_class_list(file_daemon):
    msg = _refused(file_daemon, "label", name="3000000000")
    assert "0..2147483647" in msg and "--classes" in msg, msg
    reply = file_daemon.request("label", name="2147483647")
    assert "no class list" in reply["note"]  # accepted, with what it cannot check
    gen = reply["generation"]
    assert first_sample_of(file_daemon.ring, gen).meta.label == 2**31 - 1
    file_daemon.request("label", name="auto")


def test_segment_clear_returns_a_file_to_its_whole_length(file_daemon):
    d = file_daemon
    gen = d.request("segment", start=1.0, end=2.0)["generation"]
    s = first_sample_of(d.ring, gen)
    assert 1.0 - 1e-3 <= _clip_start(s) < 2.0
    r = CliRunner().invoke(mmctl, ["--json", "--producer", d.endpoint, "segment", "clear"])
    assert r.exit_code == 0, r.output
    cleared = json.loads(r.stdout.splitlines()[-1])["generation"]
    assert cleared > gen and d.status()["config"]["segment"] is None
    # the whole file again: clips before 1 s and after 2 s come back
    first_sample_of(d.ring, cleared, lambda s: _clip_start(s) < 1.0)
    first_sample_of(d.ring, cleared, lambda s: _clip_start(s) >= 2.0)


def test_mmctl_segment_refuses_non_numbers_and_infinities_before_sending(file_daemon):
    for args in (["segment", "1", "inf"], ["segment", "nan", "2"], ["segment", "a", "b"],
                 ["segment", "3", "1"], ["segment", "1"]):
        r = CliRunner().invoke(mmctl, ["--producer", file_daemon.endpoint, *args])
        assert r.exit_code == 2, (args, r.output)


@pytest.fixture
def short_recording(tmp_path) -> Path:
    path = tmp_path / "short.mp4"
    _av_stream.write(str(path), 1.0, "mp4", paced=False)
    return path


def test_resume_of_a_finished_file_is_refused_saying_finished_and_what_replays_it(
        short_recording):
    d = Daemon(short_recording, "--rate", "max", "--clip-frames", "4")  # no --loop
    try:
        wait_for(lambda: d.status()["state"] == "finished", what="the end of the file")
        msg = _refused(d, "resume", code="wrong_state")
        assert "finished" in msg and "segment" in msg and "--loop" in msg, msg
        st = d.status()
        assert st["state"] == "finished" and "replays it" in st["idle_reason"]
    finally:
        d.stop()


def test_a_new_segment_replays_a_finished_file(short_recording):
    d = Daemon(short_recording, "--rate", "max", "--clip-frames", "4")
    try:
        wait_for(lambda: d.status()["state"] == "finished", what="the end of the file")
        with RingReader.attach(d.ring, start="next") as reader:
            gen = d.request("segment", start=0.4, end=0.6)["generation"]
            s = reader.receive(timeout=30)
        assert s is not None and s.meta.generation == gen
        assert 0.4 - 1e-3 <= _clip_start(s) < 0.6
        wait_for(lambda: d.status()["state"] == "finished", what="the end of the segment")
    finally:
        d.stop()


def test_a_filter_change_replays_a_finished_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, extras=False)
    d = Daemon(root, "--rate", "max", "--clip-frames", "2")
    try:
        wait_for(lambda: d.status()["state"] == "finished", what="the end of the replay")
        n = d.status()["published"]
        with RingReader.attach(d.ring, start="next") as reader:
            gen = d.request("filter", spec="gray")["generation"]
            s = reader.receive(timeout=30)
        assert s is not None and s.meta.generation == gen
        assert s.arrays["video"].shape[1] == 1
        st = wait_for(lambda: (x := d.status())["state"] == "finished" and x,
                      what="the end of the second pass")
        assert st["published"] == 2 * n  # the whole dataset once more
    finally:
        d.stop()


# --- start-time checks -------------------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["--filter", "crop=2000x2000"], "larger than the 64x48 frame"),
    (["--clip-frames", "200"], "lasts 4.00 s"),
    (["--label", "3000000000"], "0..2147483647"),
], ids=["crop", "clip_longer_than_file", "label_overflow"])
def test_start_options_the_file_cannot_honour_fail_the_start_naming_why(recording, args, says):
    ring = _unique("mmt")
    runtime = tempfile.mkdtemp(prefix="mmf", dir="/tmp")
    p = subprocess.run([sys.executable, "-m", "producer.cli", "run", "--source", str(recording),
                        "--ring", ring, *args], cwd=ROOT, capture_output=True, timeout=60,
                       env={**os.environ, "MMFEED_RUNTIME_DIR": runtime})
    err = p.stderr.decode()
    assert p.returncode == 1 and says in err and "Traceback" not in err, err
    assert not Path(f"/dev/shm/{ring}").exists()


# --- generations across restarts ---------------------------------------------------------------


def _generations_seen(ring: str, n: int) -> list[int]:
    with RingReader.attach(ring, start="oldest") as r:
        out = []
        while len(out) < n:
            s = r.receive(timeout=30)
            assert s is not None
            out.append(s.meta.generation)
        return out


def test_generations_grow_across_a_restart_on_the_same_ring(recording, tmp_path):
    # `mmctl wait N` polls the trainer's last trained generation: it only means "trained on
    # change N or a later one" if no generation after a restart repeats an earlier number.
    state = tmp_path / "state"
    args = ("--loop", "--rate", "max", "--clip-frames", "4", "--state-dir", str(state))
    a = Daemon(recording, *args)
    ring = a.ring
    try:
        assert a.ready["generation"] == 1
        gen = a.request("filter", spec="gray")["generation"]
        assert gen == 2
        first_sample_of(ring, gen)
    finally:
        assert a.stop() == 0
    saved = state / "generations" / f"{ring}.json"
    assert json.loads(saved.read_text())["generation"] == 2
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    b = Daemon(recording, *args, ring=ring)
    try:
        assert b.ready["generation"] == 3 and b.status()["generation"] == 3
        assert min(_generations_seen(ring, 4)) == 3  # every sample of this run is newer
        assert b.request("filter", spec="resize=32x24")["generation"] == 4
    finally:
        b.stop()
    assert json.loads(saved.read_text())["generation"] == 4


def test_a_corrupt_generation_file_is_named_and_a_left_ring_keeps_numbers_growing(
        recording, tmp_path):
    state = tmp_path / "state"
    args = ("--loop", "--rate", "max", "--clip-frames", "4", "--state-dir", str(state))
    a = Daemon(recording, *args)
    ring, runtime = a.ring, a.runtime
    b = None
    try:
        for spec in ("gray", "rgb", "gray"):
            gen = a.request("filter", spec=spec)["generation"]
        assert gen == 4
        first_sample_of(ring, gen)
        a.proc.kill()  # SIGKILL: the ring (header generation 4) stays behind
        a.proc.wait()
        saved = state / "generations" / f"{ring}.json"
        saved.write_text("{garbage")
        b = Daemon(recording, *args, ring=ring, runtime=runtime)
        assert b.ready["generation"] == 5
        said = "\n".join(b.stderr_lines())
        assert f"generation file {saved} is corrupt" in said, said
        assert json.loads(saved.read_text())["generation"] == 5  # rewritten at once
    finally:
        a.proc.stdout.close()
        a.log.close()
        if b is not None:
            b.stop()


# --- the periodic status line -------------------------------------------------------------------


def test_the_periodic_status_line_says_paused_while_paused(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, extras=False)
    d = Daemon(root, "--loop", "--rate", "max", "--clip-frames", "2", "--status-interval", "0.2")
    try:
        wait_for(lambda: d.status()["published"] > 0, what="samples")
        d.request("pause")
        mark = len(d.stderr_lines())

        def paused_line():
            return [x for x in d.stderr_lines()[mark:] if re.search(r" status .*state=paused", x)]

        line = wait_for(paused_line, what="a status line while paused")[0]
        assert "state=running" not in line and "idle_reason=" in line, line
        d.request("resume")
    finally:
        d.stop()


# --- proving a change on a sample that is bad only for the new config ----------------------------


def test_turning_video_back_on_when_the_next_sample_has_a_bad_video_skips_that_sample(tmp_path):
    # The next sample's video.mp4 is broken. With video off it was fine; with video back on it
    # cannot be made - the sample's fault, not the change's, which another sample shows. The
    # change was refused whenever the replay happened to stand before such a sample.
    root = make_dataset(tmp_path / "ds", per_class={"train": 1}, size=(32, 24),
                        clip_seconds=0.5, extras=False)
    metas = sorted(root.rglob("metadata.json"))
    for k, meta in enumerate(metas):  # recorded times 100 s apart: the replay waits between
        m = json.loads(meta.read_text())
        m["timestamp_ns"] = 1_700_000_000_000_000_000 + k * 100 * 10**9
        meta.write_text(json.dumps(m))
    bad = metas[1].parent / "video.mp4"
    bad.write_bytes(bad.read_bytes()[:200])
    d = Daemon(root, "--rate", "recorded", "--clip-frames", "2")
    try:
        wait_for(lambda: d.status()["published"] == 1, what="the first sample")
        d.request("modalities", enable=[], disable=["video"])  # proven on the bad one: fine
        gen = d.request("modalities", enable=["video"], disable=[])["generation"]
        st = d.status()
        assert st["generation"] == gen and st["skipped"] == 1
        assert metas[1].parent.name in st["last_error"] and "video.mp4" in st["last_error"]
    finally:
        d.stop()
