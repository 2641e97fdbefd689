"""A real media writer for source/daemon tests: H.264 video + AAC audio (a pure tone), muxed
by PyAV into a file or served on loopback (`tcp://127.0.0.1:PORT` with listen=1: FFmpeg's tcp
server accepts exactly ONE connection, so a client that reconnects finds nobody).

Run as a process: `python tests/_av_stream.py URL SECONDS FORMAT PACED`. PACED=1 writes at
the frame rate, like a camera (the stream then lasts as long as the test needs it); 0 writes
as fast as the reader takes it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TONE_HZ = 2000.0     # 2 kHz: FFT bin 50 exactly at 16 kHz / n_fft 400
AUDIO_RATE = 48000   # stereo at 48 kHz: the producer resamples and mixes to mono 16 kHz
FPS = 25
SIZE = (64, 48)


def write(url: str, seconds: float, fmt: str, paced: bool) -> None:
    import av

    opts = {"listen": "1"} if url.startswith("tcp:") else {}
    w, h = SIZE
    with av.open(url, "w", format=fmt, options=opts) as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "tune": "zerolatency"}
        aus = out.add_stream("aac", rate=AUDIO_RATE)
        aus.layout = "stereo"
        n_audio, t_start = 0, time.monotonic()
        for i in range(int(seconds * FPS)):
            img = np.full((h, w, 3), (i * 5) % 255, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
            while n_audio < (i + 1) * AUDIO_RATE // FPS:
                t = (n_audio + np.arange(1024)) / AUDIO_RATE
                tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
                f = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp",
                                               layout="stereo")
                f.sample_rate, f.pts = AUDIO_RATE, n_audio
                for p in aus.encode(f):
                    out.mux(p)
                n_audio += 1024
            if paced:  # a camera's frame clock, not a test waiting for something
                time.sleep(max(0.0, t_start + (i + 1) / FPS - time.monotonic()))
        for p in vs.encode():
            out.mux(p)
        for p in aus.encode():
            out.mux(p)


def spawn(url: str, seconds: float, fmt: str = "mpegts", paced: bool = True) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__)), url, str(seconds), fmt,
                             "1" if paced else "0"], stderr=subprocess.PIPE)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    # A probe connection would be the stream's one accepted client; look at the table instead.
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in f.readlines()[1:])


if __name__ == "__main__":
    write(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4] == "1")
