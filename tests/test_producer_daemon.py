"""`mm-producer run` as a real process: ring in /dev/shm, control over a real ZeroMQ socket,
real signals. Most tests share one daemon replaying a small synthetic dataset (module
fixture); the ones that kill, stop or starve a daemon start their own.

Every wait polls a condition with a deadline; nothing sleeps "long enough".
"""
from __future__ import annotations

import collections
import grp
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _av_stream  # noqa: E402
from _polling import wait_for  # noqa: E402
from _control_wire import must_answer  # noqa: E402

from producer.dataset import index_dataset
from producer.modalities import audio, lidar
from producer.pipeline import PipelineConfig
from producer.synth import make_bad_samples, make_dataset
from click.testing import CliRunner

from cli.mmctl import main as mmctl
from protocol import logs
from protocol.control import ControlClient, CurveClientKeys, Timeouts, keygen
from protocol.errors import ProducerGone, RemoteError
from protocol.ring import RingReader

ROOT = Path(__file__).resolve().parents[1]
T0_NS = 1_700_000_000_000_000_000  # producer/synth.py stamps samples on whole seconds from here
SLOT_BYTES = 1 << 20                # a synthetic sample is ~0.36 MB
MAX_RING_BYTES = 12 << 20           # 8 slots of 1 MiB fit, 8 of a 400x400 clip (~2 MB) do not


# --- helpers ------------------------------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Daemon:
    """One `mm-producer run` subprocess and what a test needs to talk to it.

    `control`: a `--control` endpoint (a function of the runtime dir, which is made here);
    default: the daemon's default socket in that dir. `curve`: the test client's keys."""

    def __init__(self, source, *args: str, env: dict | None = None, ring: str | None = None,
                 runtime: str | None = None, control=None, curve: CurveClientKeys | None = None):
        self.ring = ring or _unique("mmt")
        self.runtime = runtime or tempfile.mkdtemp(prefix="mmf", dir="/tmp")
        if callable(control):
            control = control(self.runtime)
        if control is not None:
            args = ("--control", control, *args)
        self.endpoint = control or f"ipc://{self.runtime}/producer.sock"
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        full_env.update({"MMFEED_RUNTIME_DIR": self.runtime, **(env or {})})
        # stderr to a file: a pipe nobody drains would block the daemon once it is full.
        self.log = open(Path(self.runtime, "stderr.log"), "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "run", "--source", str(source),
             "--ring", self.ring, "--json", *args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=self.log)
        self.ready = self.read_json(deadline_s=60)
        assert self.ready["event"] == "ready", self.ready
        self.client = ControlClient(self.endpoint, Timeouts(request=10.0, retries=0), curve)

    def stderr_lines(self) -> list[str]:
        self.log.seek(0)
        return self.log.read().decode(errors="replace").splitlines()

    def read_json(self, deadline_s: float) -> dict:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)
            if self.proc.poll() is not None:
                break
        raise AssertionError(f"no JSON line from the daemon; stderr:\n{self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def request(self, cmd: str, **args) -> dict:
        return self.client.request(cmd, **args)

    def status(self) -> dict:
        return self.request("status")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"SIGTERM did not stop the daemon:\n{self.stderr_tail()}")
        self.proc.stdout.close()
        self.log.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        return self.proc.returncode


def first_sample_of(ring: str, generation: int, want=lambda s: True, deadline_s: float = 30.0):
    """The first sample of `generation` (or later) that satisfies `want`."""
    with RingReader.attach(ring, start="newest") as reader:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            s = reader.receive(timeout=0.5)
            if s is not None and s.meta.generation >= generation and want(s):
                return s
    raise AssertionError(f"no sample of generation {generation} in {deadline_s} s")


# --- the shared daemon ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay") / "ds"
    make_dataset(root, per_class={"train": 2}, size=(32, 24), clip_seconds=0.5)
    return root


@pytest.fixture(scope="module")
def daemon(dataset, tmp_path_factory):
    # A second copy of the dataset with one bad sample among the good ones.
    root = tmp_path_factory.mktemp("with_bad") / "ds"
    shutil.copytree(dataset, root)
    bad = make_bad_samples(root)
    for case, path in bad.items():  # keep one the index accepts but the pipeline rejects
        if case != "truncated_video":
            shutil.rmtree(path, ignore_errors=True)
    # A control socket of its own name: where the log socket goes then is tested on this
    # daemon (the default name is what every other daemon here uses).
    d = Daemon(root, "--loop", "--rate", "max", "--clip-frames", "4",
               "--slot-bytes", str(SLOT_BYTES), "--max-ring-bytes", str(MAX_RING_BYTES),
               control=lambda run: f"ipc://{run}/ctl.sock")
    d.dataset = root
    yield d
    d.stop()


def test_status_reports_state_generation_source_and_ring(daemon):
    wait_for(lambda: daemon.status()["published"] > 3, what="samples published")
    st = daemon.status()
    assert st["state"] == "running"
    assert st["generation"] >= 1
    assert st["ring"] == daemon.ring and st["ring_epoch"] == daemon.ready["ring_epoch"]
    assert "dataset" in st["source"] and st["config"]["clip_frames"] == 4
    assert st["heartbeat_age_s"] < 5.0
    assert st["blas_threads"] == 1  # numpy's BLAS spin-waits with more (producer/run.py)
    assert wait_for(lambda: daemon.status()["samples_per_s"] > 0, what="a rate")


def test_bad_sample_in_replay_is_skipped_counted_and_the_loop_continues(daemon):
    st = wait_for(lambda: (s := daemon.status())["skipped"] >= 1 and s, what="a skipped sample")
    assert "bad_truncated_video" in st["last_error"] and "video.mp4" in st["last_error"]
    n = st["published"]
    wait_for(lambda: daemon.status()["published"] > n + 2, what="publishing after the bad sample")


def test_filter_gray_makes_next_generation_with_one_channel_video(daemon):
    reply = daemon.request("filter", spec="gray")
    gen = reply["generation"]
    s = first_sample_of(daemon.ring, gen, lambda s: "video" in s.arrays)
    assert s.meta.generation == gen
    assert s.arrays["video"].shape == (4, 1, 24, 32)
    with RingReader.attach(daemon.ring) as r:
        assert r.generation >= gen  # the ring header names the generation too
    gen2 = daemon.request("filter", spec="rgb")["generation"]
    assert gen2 == gen + 1 or gen2 > gen
    s = first_sample_of(daemon.ring, gen2, lambda s: "video" in s.arrays)
    assert s.arrays["video"].shape[1] == 3


def test_filter_pixel_format_yuv420_makes_a_generation_of_nv12_planes(daemon):
    gen = daemon.request("filter", spec="pixel_format=yuv420")["generation"]
    s = first_sample_of(daemon.ring, gen, lambda s: "video" in s.arrays)
    spec = s.schema.spec("video")
    assert spec.layout == "nv12/bt601/limited/left" and spec.shape == (4, 3, 24, 32)
    assert s.arrays["video"].shape == (4, 32 * 24 * 3 // 2)  # 1.5 bytes a pixel
    shown = {m["name"]: m for m in daemon.request("preview")["modalities"]}
    assert shown["video"]["shape"][-3:] == [3, 24, 32]  # drawn as its RGB picture
    gen2 = daemon.request("filter", spec="rgb")["generation"]
    s = first_sample_of(daemon.ring, gen2, lambda s: "video" in s.arrays)
    assert not s.schema.spec("video").layout and s.arrays["video"].shape == (4, 3, 24, 32)


def test_sensor_switch_feeds_lidar_from_the_other_file(daemon):
    gen = daemon.request("sensor", input="lidar", stem="lidar_front")["generation"]
    index = {s.key: s for s in index_dataset(daemon.dataset).samples}

    def has_front(s):
        return "lidar" in s.arrays and "lidar_front" in index[s.meta.source].files

    s = first_sample_of(daemon.ring, gen, has_front)
    files = index[s.meta.source]
    cfg = PipelineConfig().lidar
    front = lidar.bev(lidar.load_points(files.files["lidar_front"], files.metadata), cfg)
    top = lidar.bev(lidar.load_points(files.files["lidar"], files.metadata), cfg)
    np.testing.assert_allclose(s.arrays["lidar"], front, rtol=1e-6)
    assert not np.allclose(s.arrays["lidar"], top)  # it really is the other file
    daemon.request("sensor", input="lidar", stem="lidar")


def test_segment_change_moves_sample_timestamps(daemon):
    gen = daemon.request("segment", start=0.2, end=0.4)["generation"]
    s = first_sample_of(daemon.ring, gen)
    assert (s.meta.timestamp_ns - T0_NS) % 1_000_000_000 == 200_000_000
    gen = daemon.request("segment", start=0.1, end=0.5)["generation"]
    s = first_sample_of(daemon.ring, gen)
    assert (s.meta.timestamp_ns - T0_NS) % 1_000_000_000 == 100_000_000


def test_pause_stops_publishing_and_resume_restarts_it(daemon):
    assert daemon.request("pause")["state"] == "paused"
    try:
        st = daemon.status()
        assert st["state"] == "paused"
        with RingReader.attach(daemon.ring, start="next") as reader:
            assert reader.receive(timeout=1.5) is None  # ~20 samples/s before the pause
        assert daemon.status()["published"] == st["published"]
        assert daemon.status()["heartbeat_age_s"] < 1.0  # paused, not dead
    finally:
        daemon.request("resume")
    with RingReader.attach(daemon.ring, start="next") as reader:
        assert reader.receive(timeout=20) is not None
    assert daemon.status()["published"] > st["published"]


def test_label_overrides_class_of_replayed_samples(daemon):
    gen = daemon.request("label", name="square")["generation"]
    s = first_sample_of(daemon.ring, gen)
    assert s.meta.label == index_dataset(daemon.dataset).classes.index("square")
    daemon.request("label", name="auto")


def test_disabling_a_modality_removes_it_from_the_schema(daemon):
    gen = daemon.request("modalities", enable=[], disable=["audio"])["generation"]
    assert "audio" not in first_sample_of(daemon.ring, gen).arrays
    assert "audio" not in daemon.request("modalities")["enabled"]
    gen = daemon.request("modalities", enable=["audio"], disable=[])["generation"]
    assert "audio" in first_sample_of(daemon.ring, gen).arrays


def test_method_switch_changes_radar_processing(daemon):
    gen = daemon.request("method", input="radar", name="range_azimuth")["generation"]
    assert daemon.status()["config"]["methods"]["radar"] == "range_azimuth"
    assert "radar" in first_sample_of(daemon.ring, gen, lambda s: "radar" in s.arrays).arrays
    daemon.request("method", input="radar", name="range_doppler")


def test_logs_command_returns_recent_records(daemon):
    recs = daemon.request("logs", n=50)["records"]
    assert any(r["msg"] == "producer ready" for r in recs) or recs


def _schema_lines(daemon) -> list[tuple[int, str]]:
    """(generation, schema) of every "sample schema" line in the daemon's stderr."""
    out = []
    for line in daemon.stderr_lines():
        m = re.search(r" sample schema generation=(\d+) schema=(.*)$", line)
        if m:
            out.append((int(m.group(1)), m.group(2)))
    return out


def test_sample_schema_is_logged_once_per_generation_and_schema(daemon):
    # producer/synth.py gives the unknown sensor (imu) a metadata dtype in even samples only,
    # so consecutive samples alternate between two schemas; a line per change of schema was
    # a line per sample (6,811 in one demo run, all of them in the journal under systemd).
    passes = 2 * len(index_dataset(daemon.dataset).samples)
    n = daemon.status()["published"]
    wait_for(lambda: daemon.status()["published"] >= n + passes + 2, what="two more passes")
    counts = collections.Counter(_schema_lines(daemon))
    assert counts and max(counts.values()) == 1, counts.most_common(3)
    per_generation = collections.Counter(g for g, _ in counts)
    assert max(per_generation.values()) >= 2, counts  # the replay did alternate


def _poke(daemon) -> None:
    """Make the daemon log a record while changing nothing: it refuses an unknown command
    with a warning in its log."""
    try:
        daemon.request("poke")
    except RemoteError:
        pass


def _mmctl_follow(daemon, *options: str) -> tuple[int, str, str]:
    """`mmctl OPTIONS --json logs -f producer --count 1` as its own process, poking the
    daemon until a record reaches it (PUB/SUB's slow joiner: records published before the
    subscription arrived are never seen). Returns (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MMFEED_PRODUCER", "MMFEED_TRAINER")}
    p = subprocess.Popen([sys.executable, "-m", "cli.mmctl", *options, "--json", "logs", "-f",
                          "producer", "--count", "1"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        _poke(daemon)
        try:
            p.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    return p.returncode, out.decode(), err.decode()


def test_logs_follow_next_to_a_custom_control_socket_gets_the_daemons_records(daemon):
    # The daemon was started with --control ipc://RUN/ctl.sock: its log socket is
    # RUN/ctl.log.sock, exactly where `mmctl --producer .../ctl.sock logs -f` looks.
    assert daemon.endpoint.endswith("/ctl.sock")
    assert daemon.ready["logs"] == daemon.endpoint.removesuffix(".sock") + ".log.sock"
    rc, out, err = _mmctl_follow(daemon, "--producer", daemon.endpoint)
    assert rc == 0, err
    rec = json.loads(out.splitlines()[-1])
    assert rec["daemon"] == "producer" and rec["msg"], rec


BAD_REQUESTS = {
    "garbage_bytes": (b"\xff\xfe\x00garbage", "malformed"),
    "oversized": (json.dumps({"v": 1, "cmd": "status", "args": {"x": "a" * 70_000}}).encode(),
                  "too_large"),
    "json_array": (b'[1, 2, 3]', "malformed"),
    "unknown_command": (b'{"v": 1, "cmd": "explode", "args": {}}', "unknown_command"),
    "wrong_version": (b'{"v": 99, "cmd": "status", "args": {}}', "version_mismatch"),
    "bad_filter": (b'{"v": 1, "cmd": "filter", "args": {"spec": "sepia"}}', "bad_argument"),
    "missing_stem": (b'{"v": 1, "cmd": "sensor", "args": {"input": "lidar", "stem": "lidar_rear"}}',
                     "bad_argument"),
    "bad_segment": (b'{"v": 1, "cmd": "segment", "args": {"start": 2.0, "end": 1.0}}',
                    "bad_argument"),
    "bad_method": (b'{"v": 1, "cmd": "method", "args": {"input": "radar", "name": "fft9"}}',
                   "bad_argument"),
    # numbers that fit JSON but not their field (issue 12): each was accepted once
    "segment_past_int64_ns": (b'{"v": 1, "cmd": "segment", "args": {"start": 1e10, "end": 2e10}}',
                              "bad_argument"),
    "segment_negative": (b'{"v": 1, "cmd": "segment", "args": {"start": -1, "end": 0.2}}',
                         "bad_argument"),
    # 1e400 overflows a double: the control layer refuses the message before any handler
    "segment_infinite": (b'{"v": 1, "cmd": "segment", "args": {"start": 0, "end": 1e400}}',
                         "malformed"),
    "segment_empty": (b'{"v": 1, "cmd": "segment", "args": {"start": 0.3, "end": 0.3}}',
                      "bad_argument"),
    "label_past_int32": (b'{"v": 1, "cmd": "label", "args": {"name": "3000000000"}}',
                         "bad_argument"),
    "label_beyond_classes": (b'{"v": 1, "cmd": "label", "args": {"name": "7"}}', "bad_argument"),
    "crop_larger_than_frame": (b'{"v": 1, "cmd": "filter", "args": {"spec": "crop=2000x2000"}}',
                               "bad_argument"),
    "fps_denormal": (b'{"v": 1, "cmd": "filter", "args": {"spec": "fps=1e-300"}}',
                     "bad_argument"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_error_changes_nothing_and_daemon_still_answers(daemon, case):
    payload, code = BAD_REQUESTS[case]
    before = daemon.status()["generation"]
    reply = must_answer(daemon.endpoint, payload)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert daemon.status()["generation"] == before
    if case == "missing_stem":  # the message names the stems that do exist
        assert "lidar_rear" in reply["error"]["message"]
        assert "lidar, lidar_front" in reply["error"]["message"]


def test_label_beyond_the_class_list_is_refused_listing_the_classes(daemon):
    with pytest.raises(RemoteError) as e:
        daemon.request("label", name="7")
    assert e.value.code == "bad_argument"
    assert "0 circle, 1 square, 2 stripes" in str(e.value), str(e.value)


def test_label_by_class_index_within_the_list_is_accepted(daemon):
    gen = daemon.request("label", name="2")["generation"]
    assert first_sample_of(daemon.ring, gen).meta.label == 2
    daemon.request("label", name="auto")


def test_crop_larger_than_the_datasets_frames_is_refused_naming_the_frame_size(daemon):
    with pytest.raises(RemoteError) as e:
        daemon.request("filter", spec="crop=2000x2000")
    assert "larger than the 32x24 frame of video.mp4 in sample train/" in str(e.value)
    with pytest.raises(RemoteError) as e:
        daemon.request("filter", spec="crop=16x16+20+0")
    assert "reaches past the edge of the 32x24 frame" in str(e.value)
    gen = daemon.request("filter", spec="crop=16x16+16+8")["generation"]  # fits exactly
    assert first_sample_of(daemon.ring, gen, lambda s: "video" in s.arrays
                           ).arrays["video"].shape == (4, 3, 16, 16)
    daemon.request("filter", spec="none")


def test_segment_too_far_for_a_timestamp_is_refused_on_samples_without_video_or_audio(daemon):
    # Without video and audio nothing decodes the segment, so only the range check stands
    # between 1e10 s and the int64 nanosecond timestamp (which it overflowed).
    gen = daemon.request("modalities", enable=[], disable=["video", "audio"])["generation"]
    try:
        with pytest.raises(RemoteError) as e:
            daemon.request("segment", start=1e10, end=1e10 + 1)
        assert e.value.code == "bad_argument" and "1e+07" in str(e.value), str(e.value)
        assert daemon.status()["generation"] == gen
    finally:
        daemon.request("modalities", enable=["video", "audio"], disable=[])
    wait_for(lambda: daemon.status()["state"] == "running", what="the daemon to go on")


def test_filter_too_big_for_any_ring_within_the_cap_is_refused_naming_the_sizes(daemon):
    # A bigger sample moves the ring to bigger slots (test_ring_layouts.py); what is refused
    # is a sample no layout within --max-ring-bytes holds.
    before = daemon.status()["generation"]
    with pytest.raises(RemoteError) as e:
        daemon.request("filter", spec="resize=400x400")
    assert e.value.code == "bad_argument"
    msg = str(e.value)
    need = int(re.search(r"samples of (\d+) bytes", msg).group(1))
    assert need > 4 * 3 * 400 * 400 and f"above the cap of {MAX_RING_BYTES}" in msg, msg
    assert daemon.status()["generation"] == before
    assert daemon.status()["config"]["filter"] in ("none", "rgb")


# --- daemons of their own ---------------------------------------------------------------------


def test_sigkill_then_restart_replaces_stale_ring_and_readers_reattach(dataset):
    a = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2")
    ring, runtime = a.ring, a.runtime
    b = None
    try:
        reader = RingReader.attach(ring, start="oldest")
        assert reader.receive(timeout=30) is not None
        a.proc.kill()  # SIGKILL: no cleanup; the ring and the socket file stay behind
        a.proc.wait()
        assert Path(f"/dev/shm/{ring}").exists()
        b = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2", ring=ring,
                   runtime=runtime)
        assert b.ready["ring_epoch"] != a.ready["ring_epoch"]

        def gone():
            try:
                reader.receive(timeout=0.2)
            except ProducerGone:
                return True
            return False

        wait_for(gone, what="ProducerGone for the old epoch")
        reader.close()
        with RingReader.attach(ring) as again:
            assert again.epoch == b.ready["ring_epoch"]
            assert again.receive(timeout=30) is not None
        assert b.status()["state"] == "running"
    finally:
        a.proc.stdout.close()
        a.log.close()
        if b is not None:
            b.stop()


def _notify_socket(tmp: str) -> tuple[socket.socket, str]:
    path = os.path.join(tmp, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    return s, path


def _datagrams(sock: socket.socket, until: str, deadline_s: float = 30.0) -> list[str]:
    got, deadline = [], time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], 0.2)
        if r:
            got.append(sock.recv(4096).decode())
            if any(until in g for g in got):
                return got
    raise AssertionError(f"no {until} datagram; got {got}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_sd_notify_ready_and_watchdog_then_stop_signal_removes_ring_and_exits_zero(dataset, sig):
    # SIGTERM is systemd's stop; SIGINT is Ctrl-C in a terminal: the same clean exit.
    tmp = tempfile.mkdtemp(prefix="mmn", dir="/tmp")
    sock, path = _notify_socket(tmp)
    d = None
    try:
        d = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2",
                   env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        got = _datagrams(sock, "READY=1")
        assert any(g.startswith("READY=1") for g in got)
        _datagrams(sock, "WATCHDOG=1")
        shm = Path(f"/dev/shm/{d.ring}")
        assert shm.exists()
        reader = RingReader.attach(d.ring, start="next", register=False)
        d.proc.send_signal(sig)
        assert d.proc.wait(timeout=30) == 0
        summary = d.read_json(deadline_s=5)
        assert summary["event"] == "exit" and summary["published"] >= 1
        # The sample in progress was finished: every sample the daemon counted is committed
        # in the ring (the reader's mapping outlives the unlinked name).
        assert reader.ring_stats().published == summary["published"]
        reader.close()
        _datagrams(sock, "STOPPING=1")
        assert not shm.exists()
        assert not Path(d.runtime, "producer.sock").exists()
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if d is not None:
            d.stop()


def test_vanished_source_is_retried_and_reported_while_daemon_answers(dataset, tmp_path):
    video = tmp_path / "cam.mp4"
    shutil.copy(next(dataset.rglob("video.mp4")), video)
    d = Daemon(video, "--loop", "--rate", "max", "--clip-frames", "2")
    try:
        wait_for(lambda: d.status()["published"] >= 2, what="clips from the file")
        away = tmp_path / "away.mp4"
        video.rename(away)
        st = wait_for(lambda: (s := d.status())["state"] == "source-error" and s["retries"] >= 1
                      and s, what="source-error with retries")
        assert str(video) in st["last_error"]
        n = st["published"]
        away.rename(video)
        wait_for(lambda: (s := d.status())["state"] == "running" and s["published"] > n,
                 what="recovery after the file came back")
    finally:
        d.stop()


# A live stream served on loopback, paced like a camera: 25 frames per second of wall-clock
# time from the moment the daemon connects (listen=1: one client only).
WRITER = r"""
import sys, time, av, numpy as np
url, n = sys.argv[1], int(sys.argv[2])
with av.open(url, "w", format="mpegts", options={"listen": "1"}) as out:
    st = out.add_stream("libx264", rate=25)
    st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
    st.options = {"preset": "ultrafast", "tune": "zerolatency"}
    t0 = time.monotonic()
    for i in range(n):
        img = np.full((48, 64, 3), (i * 5) % 255, np.uint8)
        for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(p)
        time.sleep(max(0.0, t0 + (i + 1) / 25 - time.monotonic()))
    for p in st.encode():
        out.mux(p)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair() -> int:
    """A port P with P + 1 free too (a tcp control socket's log socket is on P + 1)."""
    for _ in range(100):
        port = _free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no two adjacent free ports on 127.0.0.1")


TICK_NS = 100_000_000  # the recorder's lidar period: 0.1 s


def _scene(ts_ns: int) -> np.ndarray:
    """A lidar frame unlike any other here: 8 points in the BEV cell numbered by the frame's
    0.1 s tick (150 x 150 cells of 0.5 m: unique over 37 minutes of frames)."""
    k = ts_ns // TICK_NS
    pts = np.zeros((8, 4), np.float32)  # x, y, z, intensity (KITTI .bin)
    pts[:, 0] = -37.25 + 0.5 * (k % 150) + np.linspace(-0.1, 0.1, 8)
    pts[:, 1] = -37.25 + 0.5 * ((k // 150) % 150)
    pts[:, 2] = 0.5
    pts[:, 3] = 0.25 + 0.5 * (k % 2)
    return pts


def _drop(folder: Path, ts_ns: int) -> Path:
    """Write `lidar_<ts_ns>.bin` as a recorder would: whole, under its final name at once."""
    path = folder / f"lidar_{ts_ns}.bin"
    part = folder / f".{path.name}.part"  # hidden names are skipped by the folder scan
    _scene(ts_ns).tofile(part)
    os.replace(part, path)
    return path


def test_live_stream_on_loopback_pairs_each_clip_with_the_watched_lidar_file_nearest_its_time(
        tmp_path):
    # The stream's clips are stamped with wall-clock time; a recorder drops lidar frames into
    # the watched folder, each a different scene, so a sample's BEV says which file was used.
    watch = tmp_path / "incoming"
    watch.mkdir()
    long_ago = time.time_ns() // TICK_NS * TICK_NS - 3600 * 10**9
    for k in range(3):  # there at start, an hour before the stream: no clip can use them
        _drop(watch, long_ago + k * TICK_NS)
    (watch / "calibration.yaml").write_text("no timestamp in my name")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url + "?listen=1", "3000"],
                              stderr=subprocess.PIPE)
    d = None
    try:
        wait_for(lambda: _listening(port), what="the stream server")
        d = Daemon(url, "--clip-frames", "4", "--rate", "max", "--read-timeout", "5",
                   "--watch", str(watch))
        s = first_sample_of(d.ring, 1)
        assert s.arrays["video"].shape == (4, 3, 48, 64)
        assert "stream" in d.status()["source"]
        # Clips with no lidar frame near their time go without lidar: counted per stem in
        # status and said once in the log, never silently and never once per clip.
        wait_for(lambda: d.status()["unaligned"].get("lidar", 0) >= 3, what="unaligned clips")
        assert "lidar" not in s.arrays
        d.request("pause")
        unaligned = d.status()["unaligned"]["lidar"]
        with RingReader.attach(d.ring, start="newest") as r:
            last = r.receive(timeout=10)
        # Frames arrive while the daemon runs: from 2 s before its last clip to 30 s after.
        tick = last.meta.timestamp_ns // TICK_NS * TICK_NS
        dropped = {tick + k * TICK_NS: None for k in range(-20, 300)}
        for t in dropped:
            dropped[t] = _drop(watch, t)
        times = np.array(sorted(dropped), np.int64)
        cfg = PipelineConfig().lidar
        with RingReader.attach(d.ring, start="next") as reader:
            d.request("resume")
            for _ in range(4):
                s = reader.receive(timeout=30)
                assert s is not None and "lidar" in s.arrays, d.stderr_tail()
                # The clip spans 4 frames at 25 fps; the daemon pairs its centre with the
                # nearest frame (either one when two are equally near, to a millisecond).
                dist = np.abs(times - (s.meta.timestamp_ns + 80_000_000))
                nearest = [dropped[int(t)] for t in times[dist <= dist.min() + 1_000_000]]
                assert any(np.array_equal(s.arrays["lidar"],
                                          lidar.bev(lidar.load_points(p), cfg)) for p in nearest), \
                    (s.meta, nearest)
        assert d.status()["unaligned"]["lidar"] == unaligned  # every later clip had its frame
        tail = "\n".join(d.stderr_lines())
        assert tail.count("watched lidar files are not aligned") == 1
        # the file it cannot place in time is named once, with the naming rule, not dropped silently
        assert tail.count("ignoring calibration.yaml: no timestamp") == 1
    finally:
        if d is not None:
            d.stop()
        writer.kill()
        writer.wait()
        writer.stderr.close()


def test_tcp_control_with_curve_dir_answers_only_clients_whose_keys_it_allows(dataset, tmp_path):
    keys, intruder = tmp_path / "keys", tmp_path / "intruder"
    keygen(keys)      # what `mmctl keygen` writes: the daemon gets --curve-dir keys
    keygen(intruder)  # a client keypair the daemon was never given ...
    shutil.copy(keys / "server.key", intruder / "server.key")  # ... that knows the server's key
    port = _free_port_pair()
    url = f"tcp://127.0.0.1:{port}"
    d = Daemon(dataset, "--loop", "--rate", "max", "--clip-frames", "2", "--curve-dir", str(keys),
               control=url, curve=CurveClientKeys.from_dir(keys))
    try:
        assert d.ready["control"] == url and d.ready["logs"] == f"tcp://127.0.0.1:{port + 1}"
        r = CliRunner().invoke(mmctl, ["--json", "--keys", str(keys), "--producer", url,
                                       "status", "producer"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout.splitlines()[-1])["producer"]["ring"] == d.ring
        # the log socket next to it (port + 1) takes the same keys
        rc, out, err = _mmctl_follow(d, "--keys", str(keys), "--producer", url)
        assert rc == 0, err
        assert json.loads(out.splitlines()[-1])["daemon"] == "producer"
        # a key that is not in clients/: no reply, and no records
        r = CliRunner().invoke(mmctl, ["--json", "--timeout", "2", "--keys", str(intruder),
                                       "--producer", url, "status", "producer"])
        assert r.exit_code == 3, r.output
        assert "CURVE keys" in json.loads(r.stdout.splitlines()[-1])["errors"]["producer"]["message"]
        stop = threading.Event()

        def keep_poking():
            while not stop.wait(0.1):
                _poke(d)

        poker = threading.Thread(target=keep_poking)
        poker.start()
        try:
            got = list(logs.follow(d.ready["logs"], timeout=3,
                                   curve=CurveClientKeys.from_dir(intruder)))
        finally:
            stop.set()
            poker.join()
        assert got == []
        assert d.status()["state"] == "running"  # and the daemon never minded
    finally:
        d.stop()


def _listening(port: int) -> bool:
    # A probe connection would be the stream's one accepted client; look at the table instead.
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in f.readlines()[1:])


def _clip_start(s) -> float:
    return float(s.meta.source.rsplit("@", 1)[1].rstrip("s"))


def test_live_stream_with_audio_gives_samples_with_the_tone_and_switches_filter_unplugged():
    # One connection only (listen=1): a producer that reopened the stream for the audio, or to
    # apply the filter, would find nobody listening and fall into source-error.
    port = _av_stream.free_port()
    url = f"tcp://127.0.0.1:{port}"
    writer = _av_stream.spawn(url + "?listen=1", seconds=60)
    d = None
    try:
        wait_for(lambda: _av_stream.listening(port), what="the stream server")
        d = Daemon(url, "--clip-frames", "4", "--rate", "max", "--read-timeout", "5")
        s = first_sample_of(d.ring, 1, lambda s: s.meta.index >= 3)  # past the AAC priming
        assert set(s.arrays) == {"video", "audio"}
        assert s.arrays["video"].shape == (4, 3, 48, 64)
        mel = s.arrays["audio"][0]
        cfg = PipelineConfig().audio
        assert mel.shape == (cfg.n_mels, cfg.n_frames)
        # The clip spans 4 frames at 25 fps = 0.16 s: that much is the tone, the rest of the
        # configured second is padding at the log floor (as for a file's segment).
        loud = mel.max(axis=0) > np.log(cfg.eps) + 10
        span_frames = 0.16 * cfg.sample_rate / cfg.hop
        assert loud[:int(span_frames) - 2].all() and not loud[int(span_frames) + 4:].any()
        fb = audio.mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
        tone_bin = int(np.argmax(fb[:, round(_av_stream.TONE_HZ * cfg.n_fft / cfg.sample_rate)]))
        assert int(np.argmax(mel[:, loud].mean(axis=1))) == tone_bin
        assert "audio" in d.request("modalities")["enabled"]

        with RingReader.attach(d.ring, start="next") as reader:
            gen = d.request("filter", spec="gray")["generation"]
            seen = []
            deadline = time.monotonic() + 30
            while sum(x.meta.generation == gen for x in seen) < 2 and time.monotonic() < deadline:
                x = reader.receive(timeout=0.5)
                if x is not None:
                    seen.append(x)
        new = [x for x in seen if x.meta.generation == gen]
        assert len(new) >= 2, f"no samples of generation {gen}: {[x.meta for x in seen]}"
        assert all(x.arrays["video"].shape == (4, 1, 48, 64) and "audio" in x.arrays for x in new)
        gens = [x.meta.generation for x in seen]
        assert gens == sorted(gens)  # the switch is at one clip boundary, never back and forth
        # Same connection: clip numbers and stream time run on across the switch.
        assert [x.meta.index for x in seen] == list(range(seen[0].meta.index,
                                                          seen[0].meta.index + len(seen)))
        np.testing.assert_allclose(np.diff([_clip_start(x) for x in seen]), 0.16, atol=0.011)
        st = d.status()
        assert st["state"] == "running" and st["source_errors"] == 0, st
        assert writer.poll() is None  # the server still has its one client
    finally:
        if d is not None:
            d.stop()
        writer.kill()
        writer.wait()
        writer.stderr.close()


# --- delivery modes, permissions, pacing --------------------------------------------------------


def test_lossless_producer_waits_for_a_slow_reader_and_drops_nothing(dataset):
    slots = 4
    d = Daemon(dataset, "--mode", "lossless", "--loop", "--rate", "max", "--clip-frames", "2",
               "--slots", str(slots))
    try:
        with RingReader.attach(d.ring, start="next") as reader:
            start = reader.stats().position
            got = []
            for consumed in range(8):
                # The producer fills every slot this reader has not freed, then waits for it:
                # the published count follows the reader, whatever the speeds.
                full = start + consumed + slots
                wait_for(lambda: d.status()["published"] == full,
                         what=f"the producer to fill the ring up to sample {full}")
                assert d.status()["published"] == full  # and it stays there until we read
                s = reader.receive(timeout=10)
                assert s is not None
                got.append(s.meta.index)
            assert reader.stats().dropped == 0
        assert got == list(range(got[0], got[0] + len(got)))  # every sample, in order
        st = d.status()
        assert st["mode"] == "lossless" and st["dropped"] == 0 and st["state"] == "running"
    finally:
        d.stop()


def _other_group() -> tuple[str, int]:
    """A group that is not the process's own (so a chgrp shows), when we may use one."""
    if os.getuid() == 0:
        for name in ("daemon", "nogroup", "users"):
            try:
                g = grp.getgrnam(name)
            except KeyError:
                continue
            if g.gr_gid != os.getgid():
                return g.gr_name, g.gr_gid
    g = grp.getgrgid(os.getgid())
    return g.gr_name, g.gr_gid


def _ipc_path(endpoint: str) -> str:
    assert endpoint.startswith("ipc://"), endpoint
    return endpoint.removeprefix("ipc://")


def test_group_option_makes_ring_and_sockets_0660_with_that_group(dataset):
    name, gid = _other_group()
    d = Daemon(dataset, "--group", name, "--loop", "--rate", "max", "--clip-frames", "2")
    try:
        for path in (f"/dev/shm/{d.ring}", _ipc_path(d.endpoint), _ipc_path(d.ready["logs"])):
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o660, (path, oct(st.st_mode))
            assert st.st_gid == gid, (path, st.st_gid, gid)
        with RingReader.attach(d.ring) as reader:  # a group reader's view: samples flow
            assert reader.receive(timeout=30) is not None
    finally:
        d.stop()


def test_without_group_ring_and_sockets_are_owner_only(daemon):
    for path in (f"/dev/shm/{daemon.ring}", _ipc_path(daemon.endpoint)):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))


def test_unknown_group_is_refused_at_start_naming_it_and_leaves_nothing(dataset):
    ring, group = _unique("mmt"), f"nogroup-{uuid.uuid4().hex[:6]}"
    runtime = tempfile.mkdtemp(prefix="mmf", dir="/tmp")
    try:
        p = subprocess.run([sys.executable, "-m", "producer.cli", "run", "--source", str(dataset),
                            "--ring", ring, "--group", group], cwd=ROOT, capture_output=True,
                           env={**os.environ, "MMFEED_RUNTIME_DIR": runtime}, timeout=60)
        assert p.returncode == 1, p.stderr.decode()
        err = p.stderr.decode()
        assert group in err and "Traceback" not in err, err
        assert not Path(f"/dev/shm/{ring}").exists()
        assert not Path(runtime, "producer.sock").exists()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


# Recorded gaps between samples (s), alternating. Both far above the time one sample takes to
# make even on a loaded 2-core machine (~0.3 s seen): at 0.1 s a busy producer fell behind
# the short gaps and caught up in the long ones, and the spacing flattened.
SHORT, LONG = 0.25, 1.0


@pytest.fixture
def uneven_dataset(dataset, tmp_path):
    """The dataset re-stamped with alternating short and long gaps between samples."""
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    t = T0_NS
    for k, meta in enumerate(sorted(root.rglob("metadata.json"))):
        m = json.loads(meta.read_text())
        m["timestamp_ns"] = t
        meta.write_text(json.dumps(m))
        t += int((SHORT if k % 2 == 0 else LONG) * 1e9)
    return root


def test_recorded_rate_paces_samples_by_their_recorded_timestamps(uneven_dataset):
    d = Daemon(uneven_dataset, "--loop", "--rate", "recorded", "--clip-frames", "2")
    try:
        stamps, arrivals = [], []
        with RingReader.attach(d.ring, start="next") as reader:
            while len(stamps) < 8:
                s = reader.receive(timeout=10)
                assert s is not None, d.stderr_tail()
                arrivals.append(time.monotonic())
                stamps.append(s.meta.timestamp_ns)
        ts_gaps = np.diff(stamps) / 1e9
        wall_gaps = np.diff(arrivals)
        long_ = np.isclose(ts_gaps, LONG, atol=1e-3)
        assert (long_ | np.isclose(ts_gaps, SHORT, atol=1e-3)).all(), ts_gaps
        assert long_.any() and (~long_).any()
        # Behaviour, not speed: arrivals are spaced like the recording (long gaps stay long,
        # short ones short), and a paced replay never runs ahead of the recording. A replay
        # as fast as the ring takes it spaces every sample alike and fails both.
        assert wall_gaps[long_].mean() > wall_gaps[~long_].mean() + (LONG - SHORT) / 2, \
            (ts_gaps, wall_gaps)
        assert wall_gaps.sum() >= 0.7 * ts_gaps.sum(), (ts_gaps, wall_gaps)
    finally:
        d.stop()
