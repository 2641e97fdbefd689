"""Reading a window of one modality of a cached record (a crop of a BEV grid or a frame, a
time window of a recording) without reading the rest of it: a mixin of `CacheReader`
(cache.py), see NOTE [windows] below."""
from __future__ import annotations

import mmap
import os

import numpy as np

from . import video_store
from .cache_batch import _mincore


class WindowReads:
    """`CacheReader.read_window_into` and what it needs (a second, MADV_RANDOM map)."""

    # NOTE [windows]: `read_window_into` copies a window of one modality (a crop of a BEV grid
    # or a frame, a time window of a recording) from a second map of the shard that is advised
    # MADV_RANDOM, so a page fault reads only its own page instead of the kernel's read-around
    # (which would pull up to 32 neighbouring pages of data nobody asked for); the main map
    # keeps normal readahead for whole records. When the window's pages are not all cached, the
    # missing ones are hinted with WILLNEED in coalesced ranges first, so their reads go out
    # together rather than one synchronous fault at a time. Only the window's pages are read:
    # tests/test_windows.py checks it page by page with mincore on a cold file.

    def _window_array(self, shard: int) -> np.ndarray:
        self._shard_array(shard)  # pid check, closed check
        arr = self._window_maps[shard]
        if arr is None:
            size = os.fstat(self._fds[shard]).st_size
            if size == 0:
                arr = np.zeros(0, np.uint8)
            else:
                mm = mmap.mmap(self._fds[shard], size, prot=mmap.PROT_READ)
                if hasattr(mmap, "MADV_RANDOM"):
                    mm.madvise(mmap.MADV_RANDOM)
                self._window_mmaps.append(mm)
                arr = np.frombuffer(mm, np.uint8)
            self._window_maps[shard] = arr
        return arr

    def read_window_into(self, i: int, name: str, window, out: np.ndarray | None = None
                         ) -> np.ndarray:
        """Copy `window` of modality `name` of record i into `out` (allocated when None) and
        return it, reading only the window's bytes (NOTE [windows]).

        `window`: one `slice` (step 1) or (start, stop) pair per leading dimension of the
        modality's stored shape; dimensions not given are taken whole. A packed (NV12) modality
        is windowed in its leading dimensions (time) only. The video of a compressed record is
        decoded whole and then windowed: a codec has no partial read."""
        i = self._check(i)
        schema = self.schema(i)
        spec = schema.spec(name)
        shape = spec.stored_shape
        if not isinstance(window, (tuple, list)):
            window = (window,)
        if len(window) > len(shape):
            raise ValueError(f"window has {len(window)} dimensions, {name} is {list(shape)}")
        bounds = []
        for d, w in enumerate(list(window) + [slice(None)] * (len(shape) - len(window))):
            if isinstance(w, slice):
                if w.step not in (None, 1):
                    raise ValueError(f"window dimension {d}: step {w.step}; only 1 is read")
                start, stop, _ = w.indices(shape[d])
            else:
                start, stop = int(w[0]), int(w[1])
            if not 0 <= start < stop <= shape[d]:
                raise ValueError(f"window dimension {d}: {start}:{stop} is not inside "
                                 f"0:{shape[d]} of {name} {list(shape)}")
            bounds.append((start, stop))
        if spec.layout and bounds[-1] != (0, shape[-1]):
            raise ValueError(f"{name} is packed ({spec.layout}): window its leading "
                             f"dimensions only")
        slices = tuple(slice(a, b) for a, b in bounds)
        if out is None:
            out = np.empty([b - a for a, b in bounds], spec.dtype)
        store = int(self._store[i])
        if store in video_store.COMPRESSED:
            rest, off = video_store.rest_layout(schema)
            if name == video_store.VIDEO:  # no partial decode: the clip, then the window
                full = np.empty(schema.payload_nbytes, np.uint8)
                self.read_into(i, full)
                np.copyto(out, schema.views(full)[name][slices])
                return out
            base = int(self._offset[i]) + rest.offset(name)
        else:
            base = int(self._offset[i]) + schema.offset(name)
        arr = self._window_array(int(self._shard[i]))
        src = arr[base: base + spec.nbytes].view(spec.dtype).reshape(shape)[slices]
        self._hint_window(int(self._shard[i]), arr, base, shape, spec.itemsize, bounds)
        np.copyto(out, src)
        return out

    def _hint_window(self, shard: int, arr: np.ndarray, base: int, shape, itemsize: int,
                     bounds) -> None:
        """WILLNEED for the window's pages that are not cached (coalesced ranges)."""
        if _mincore is None:
            return
        # innermost dimension not taken whole: below it runs are contiguous
        d = max((k for k, (a, b) in enumerate(bounds) if (a, b) != (0, shape[k])), default=0)
        strides = np.cumprod([1, *shape[::-1]])[::-1][1:] * itemsize  # bytes per step, per dim
        run = (bounds[d][1] - bounds[d][0]) * int(strides[d])
        starts = np.array([base + bounds[d][0] * int(strides[d])], np.int64)
        for k in range(d - 1, -1, -1):
            steps = np.arange(bounds[k][0], bounds[k][1], dtype=np.int64) * int(strides[k])
            starts = (steps[:, None] + starts[None, :]).ravel()
        page = mmap.PAGESIZE
        addr = arr.ctypes.data
        first, last = (addr + int(starts.min())) // page, (addr + int(starts.max()) + run - 1) // page
        span = last - first + 1
        if len(self._resident) < span:
            self._resident = np.empty(span, np.uint8)
        if _mincore(first * page, span * page, self._resident.ctypes.data) != 0:
            return
        p0 = (addr + starts) // page - first
        p1 = (addr + starts + run - 1) // page - first
        marks = np.zeros(span + 1, np.int64)  # +1 where a run's pages begin, -1 after they end
        np.add.at(marks, p0, 1)
        np.add.at(marks, p1 + 1, -1)
        need = np.cumsum(marks[:span]) > 0
        cold = need & ~(self._resident[:span] & 1).astype(bool)
        if not cold.any():
            return
        edges = np.flatnonzero(np.diff(np.r_[0, cold.astype(np.int8), 0]))
        fd = self._fds[shard]
        for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            off = (first + a) * page - addr
            os.posix_fadvise(fd, max(off, 0), (b - a) * page, os.POSIX_FADV_WILLNEED)
