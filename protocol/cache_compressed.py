"""Reading a cache's compressed (h264/hevc) records: a mixin of `CacheReader` (cache.py)
that checks each record's CRC and decodes it straight into its batch row, or hands its video
blob back for a GPU decoder; see NOTE [decoding records] below. Raw and nv12 records never
come here (`CacheReader._copy_payloads`)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import video_store
from .cache_batch import RecordFailure
from .cache_format import shard_name
from .errors import CorruptRecord, SchemaError
from .schema import SampleSchema


class CompressedReads:
    """`CacheReader`'s decode path: `_decode_batch` (read_batch_into), `_decode_one`
    (read_into) and what they need (a thread pool, a scratch buffer per thread)."""

    def _start_decoding(self) -> None:
        """No pool yet (made on first use, again after a fork); no scratch buffers yet."""
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._scratch = threading.local()  # per decoding thread: cold compressed record bytes

    # NOTE [decoding records]: a batch's h264/hevc records are decoded by a small thread pool
    # (one per reader and process, made on first use), each thread taking a contiguous share of
    # the batch: PyAV releases the GIL inside libavcodec and swscale, so the threads run on all
    # cores while the training step runs. Each record's bytes come from the map when cached
    # (zero copy) or from one pread into the thread's scratch buffer after one WILLNEED round
    # for the batch's cold records; its CRC is checked, then `video_store.decode_record_into`
    # writes the other modalities and the decoded clip straight into the record's row. A record
    # that fails is a RecordFailure (the batch goes on); nothing is retried.

    def _decoder_pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.decode_threads,
                                            thread_name_prefix="mmfeed-cache-decode")
            self._pool_pid = os.getpid()
        return self._pool

    def _decode_batch(self, recs: np.ndarray, rows: np.ndarray, out2d: np.ndarray,
                      schema: SampleSchema, defer: bool = False
                      ) -> tuple[list[RecordFailure], int, list]:
        shards, offs, sizes = self._shard[recs], self._offset[recs], self._nbytes[recs]
        resident = self._resident_records(shards, offs, sizes)
        cold = np.flatnonzero(~resident)
        for k in cold.tolist():  # one round of hints: the cold records' reads overlap
            os.posix_fadvise(self._fds[int(shards[k])], int(offs[k]), int(sizes[k]),
                             os.POSIX_FADV_WILLNEED)
        jobs = list(zip(recs.tolist(), rows.tolist(), resident.tolist()))
        if defer:  # no decoding here: the rest into the rows, the blobs back to the caller
            failed, deferred = [], []
            for rec, row, warm in jobs:
                got = self._blob_of(rec, out2d[row], schema, warm)
                if isinstance(got, CorruptRecord):
                    failed.append(RecordFailure(row, rec, got))
                else:
                    deferred.append((row, rec, got))
            return failed, len(cold), deferred

        def run(share: list) -> list[RecordFailure]:
            out = []
            for rec, row, warm in share:
                error = self._decode_one(rec, out2d[row], schema, warm)
                if error is not None:
                    out.append(RecordFailure(row, rec, error))
            return out

        threads = min(self.decode_threads, len(jobs))
        if threads <= 1:
            return run(jobs), len(cold), []
        shares = [jobs[k::threads] for k in range(threads)]
        failed = [f for part in self._decoder_pool().map(run, shares) for f in part]
        return failed, len(cold), []

    def _blob_of(self, i: int, dst: np.ndarray, schema: SampleSchema,
                 warm: bool) -> "bytes | CorruptRecord":
        """The checked video blob of compressed record i (a copy), its rest copied into dst."""
        data = self._checked_bytes(i, warm)
        if isinstance(data, CorruptRecord):
            return data
        try:
            return bytes(video_store.copy_rest_into(schema, data, dst))
        except (video_store.VideoStoreError, SchemaError) as e:
            return self._corrupt(i, str(e))

    def _checked_bytes(self, i: int, warm: bool) -> "np.ndarray | CorruptRecord":
        """Record i's bytes (the map when cached, else this thread's scratch buffer), CRC
        checked."""
        n = int(self._nbytes[i])
        if warm:
            data = self._record(i)
        else:
            buf = getattr(self._scratch, "buf", None)
            if buf is None or len(buf) < n:
                buf = self._scratch.buf = bytearray(max(n, 1 << 16))
            data = np.frombuffer(buf, np.uint8, n)
            self._pread_record(i, memoryview(buf)[:n])
        if video_store.record_crc(data) != int(self._crc[i]):
            return self._corrupt(i, f"CRC-32 {video_store.record_crc(data):#010x} of its "
                                    f"{n} bytes, the index recorded {int(self._crc[i]):#010x}")
        return data

    def _decode_one(self, i: int, dst: np.ndarray, schema: SampleSchema,
                    warm: bool) -> CorruptRecord | None:
        """Decode compressed record i into dst (a row); the error instead of raising it."""
        data = self._checked_bytes(i, warm)
        if isinstance(data, CorruptRecord):
            return data
        try:
            video_store.decode_record_into(schema, data, dst)
        except (video_store.VideoStoreError, SchemaError) as e:
            return self._corrupt(i, str(e))
        return None

    def _corrupt(self, i: int, what: str) -> CorruptRecord:
        store = video_store.STORES[int(self._store[i])]
        return CorruptRecord(self._vdir / shard_name(int(self._shard[i])), i,
                             self._source[i].decode("utf-8", "replace"), int(self._offset[i]),
                             f"{store} record: {what}")
