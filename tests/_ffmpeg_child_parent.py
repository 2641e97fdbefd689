"""A parent process for tests/test_ffmpeg_child.py: supervises one ffmpeg child on SOURCE
(looping), prints the child's pid, then one line per frame, and reads until killed."""
import sys

from producer.ffmpeg_child import FfmpegChild
from producer.ffmpeg_graph import cpu_plan
from protocol.filters import FilterSpec

child = FfmpegChild(sys.argv[1], cpu_plan(FilterSpec.parse("resize=32x24,gray"), 160, 120),
                    realtime=True, loop=True)
print(f"pid {child.start()}", flush=True)
for i, frame in enumerate(child.frames()):
    print(f"frame {i}", flush=True)
