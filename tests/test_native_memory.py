"""Native memory that must not grow per clip: what tracemalloc cannot see.

The producer decodes one short clip after another for days. A few hundred bytes of native
memory lost per clip is invisible in one run and ~100 MB a day in the daemon (see
producer/modalities/_decode_loops.py for the one this guards against). Each case runs in a fresh
interpreter (the heap of the test process depends on every test before it) and reads
RssAnon after handing freed memory back (`malloc_trim`), between a warm-up and the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import heap

ROOT = Path(__file__).resolve().parents[1]

_LOOP = """
import json, sys
from pathlib import Path
import numpy as np
from producer.modalities import audio, video
from producer.synth import _frames, write_video, write_wav
from protocol import heap
from protocol.filters import FilterSpec

def rss_kib():
    heap.trim()
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

what, n, warm, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
if what == "video":
    path = tmp / "v.mp4"                                  # 20 frames; each call takes 4
    write_video(path, _frames(0, np.random.default_rng(0), (64, 48), 20))
    call = lambda: video.decode_clip(path, FilterSpec(), 4)
else:
    path = tmp / "a.wav"                                  # 2 s; each call takes 0.25 s
    write_wav(path, 0.5 * np.sin(np.arange(32000) * 0.05), 16000)
    cfg = audio.AudioConfig(duration_s=0.25)
    call = lambda: audio.log_mel(path, cfg)
mid = (warm + n) // 2
for i in range(n):
    call()
    if i == warm:
        before = rss_kib()
    elif i == mid:
        middle = rss_kib()
end = rss_kib()
print(json.dumps({"first_half_kib": middle - before, "second_half_kib": end - middle,
                  "calls_per_half": (n - warm) // 2}))
"""


@pytest.mark.skipif(heap._malloc_trim is None, reason="needs glibc's malloc_trim to read a "
                                                       "steady RssAnon")
@pytest.mark.parametrize("what", ["video", "audio"])
def test_decoding_clip_after_clip_of_a_longer_file_does_not_grow_native_memory(what, tmp_path):
    # Every call stops decoding early (the file is longer than the clip). With PyAV's demux
    # generator left unclosed that lost ~300 B a call: ~290 KiB in each half of 1000 calls.
    # A leak grows in both halves; the allocator's one-off steps (a new page of some arena,
    # seen up to 250 KiB) land in one, so the smaller half is what is judged.
    done = subprocess.run([sys.executable, "-c", _LOOP, what, "2500", "499", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert min(r["first_half_kib"], r["second_half_kib"]) < 100, r
