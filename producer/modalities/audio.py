"""Audio: any PyAV-readable audio -> a fixed-size float32 log-mel spectrogram (1, n_mels, n_frames).

Decoding, the mix to mono and resampling are FFmpeg's (av.AudioResampler, swresample), written
straight into one preallocated buffer of exactly cfg.duration_s seconds. The spectrogram is
our own numpy code (framing by stride tricks, periodic Hann window, rfft, a Slaney-style mel
filterbank as librosa builds by default, natural log), so its numbers can be checked against
librosa in a test without making librosa a runtime dependency. Frames are centred with zero
padding (librosa's `center=True, pad_mode="constant"`), so n_frames = 1 + samples // hop.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from protocol.errors import InputError

from . import _fork  # noqa: F401  (collects dead decoders before a fork; see _fork.py)
from ._decode_loops import decoded_frames
from ._out import fits


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 64
    duration_s: float = 1.0
    f_min: float = 0.0
    f_max: float | None = None  # None: Nyquist
    eps: float = 1e-10  # log floor: silence gives log(eps), never -inf

    def __post_init__(self):
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.hop <= 0 or self.n_mels <= 0:
            raise ValueError(f"AudioConfig: sample_rate, n_fft, hop, n_mels must be > 0: {self}")
        if not self.duration_s > 0:
            raise ValueError(f"AudioConfig: duration_s must be > 0, got {self.duration_s}")

    @property
    def n_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    @property
    def n_frames(self) -> int:
        return 1 + self.n_samples // self.hop


# --- the spectrogram ----------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    lin = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> np.ndarray:
    """float32 (n_mels, 1 + n_fft // 2) triangular filters, each normalised to unit area
    (Slaney), built once per configuration (cached; read-only)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_hz = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    width = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / width[:-1, None]
    falling = ramps[2:] / width[1:, None]
    fb = np.maximum(0.0, np.minimum(rising, falling))
    fb *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    fb = fb.astype(np.float32)
    fb.flags.writeable = False
    return fb


@functools.lru_cache(maxsize=16)
def _hann(n_fft: int) -> np.ndarray:
    w = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic
    w.flags.writeable = False
    return w


def mel_power(samples: np.ndarray, cfg: AudioConfig, out: np.ndarray | None = None
              ) -> np.ndarray:
    """float32 mono samples -> mel power spectrogram float32 (n_mels, 1 + len // hop);
    written into `out` when it is that (n_mels, frames) float32 array."""
    pad = cfg.n_fft // 2
    x = np.pad(samples.astype(np.float32, copy=False), pad)
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft)[:: cfg.hop]
    spec = np.fft.rfft(frames * _hann(cfg.n_fft), axis=-1)
    power = spec.real**2 + spec.imag**2
    fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
    if fits(out, (fb.shape[0], power.shape[0]), np.float32):
        return np.matmul(fb, power.T, out=out)
    return (fb @ power.T).astype(np.float32, copy=False)


def log_mel_from_samples(samples: np.ndarray, cfg: AudioConfig,
                         out: np.ndarray | None = None) -> np.ndarray:
    """float32 (1, n_mels, n_frames) log-mel of already-decoded mono samples at cfg's rate;
    computed into `out` (and `out` returned) when it is that array (modalities/_out.py)."""
    into = out[0] if fits(out, (1, cfg.n_mels, cfg.n_frames), np.float32) else None
    mel = mel_power(samples, cfg, into)
    if into is not None and mel is into:
        np.add(out, np.float32(cfg.eps), out=out)
        np.log(out, out=out)
        return out
    np.log(mel + cfg.eps, out=mel)
    return mel[None]


# --- decoding -----------------------------------------------------------------------------


#: WAV's header (fmt + data chunks) says everything FFmpeg's stream probe would otherwise
#: find by reading and decoding up to 5 s of audio: with a 2 KiB probe, opening a 2 s 16 kHz
#: wav took 0.44 ms instead of 5.9 ms (half of log_mel's whole time per sample), with the same
#: codec, rate, channels and duration on every wav tried (real 16 and 48 kHz recordings,
#: synthetic ones). Other containers (mp3, AAC in mp4 ...) keep FFmpeg's full probe.
_WAV_PROBE = {"probesize": "2048", "analyzeduration": "0"}


def _probe_options(path: str | Path) -> dict[str, str]:
    return dict(_WAV_PROBE) if str(path).lower().endswith(".wav") else {}


def load_samples(path: str | Path, cfg: AudioConfig, segment: tuple[float, float] | None = None,
                 notes: list[str] | None = None) -> np.ndarray:
    """Mono float32 samples at cfg.sample_rate, exactly cfg.n_samples long, from `segment`."""
    name = Path(str(path)).name
    try:
        container = av.open(str(path), options=_probe_options(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise InputError(path, "container", "an audio file PyAV can open",
                         found=f"{type(e).__name__}: {e}") from None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise InputError(path, "audio stream", "at least one audio stream", found=", ".join(kinds))
        stream = container.streams.audio[0]
        duration = None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        start, end = 0.0, math.inf
        if segment is not None:
            try:
                start, end = float(segment[0]), float(segment[1])
            except (TypeError, ValueError, IndexError):
                raise InputError(path, "segment", "(start_s, end_s) numbers", found=repr(segment)) from None
            if not (0.0 <= start < end):
                raise InputError(path, "segment", "0 <= start < end", found=f"({start}, {end})")
            if duration is not None and start >= duration:
                raise InputError(path, "segment", f"a start inside the file's {duration:.3f} s",
                                 found=f"start {start:.3f} s")
            if start > 0:
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
        src_rate = stream.rate or stream.codec_context.sample_rate
        channels = stream.codec_context.channels
        sr = cfg.sample_rate
        want = cfg.n_samples
        if end != math.inf:
            want = min(want, int(round((end - start) * sr)))
        out = np.zeros(cfg.n_samples, np.float32)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        skip = None  # samples (at sr) before `start` in the first decoded frame
        n = 0
        decoded_to = 0.0
        ran_out = True

        def take(chunks) -> bool:
            nonlocal n, skip
            for rf in chunks:
                a = rf.to_ndarray().reshape(-1)
                if skip > 0:
                    drop = min(skip, a.size)
                    a, skip = a[drop:], skip - drop
                m = min(a.size, want - n)
                out[n:n + m] = a[:m]
                n += m
                if n >= want:
                    return True
            return False

        try:
            with decoded_frames(container, stream) as decoded:
                for frame in decoded:
                    if skip is None:
                        t0 = frame.time if frame.time is not None else 0.0
                        skip = max(0, int(round((start - t0) * sr)))
                    if frame.time is not None:
                        decoded_to = frame.time + frame.samples / frame.sample_rate
                    if take(resampler.resample(frame)):
                        ran_out = False
                        break
                else:
                    take(resampler.resample(None))
        except av.FFmpegError as e:
            raise InputError(path, "audio data", "a decodable audio stream",
                             found=f"{type(e).__name__}: {e}") from None
    if container.format.name == "wav":
        _check_wav_length(path)
    if n == 0:
        raise InputError(path, "audio samples", "at least one sample" +
                         (f" in segment {start:g}..{end:g} s" if segment is not None else ""),
                         found="none (empty or zero-length audio)")
    if ran_out and duration is not None and decoded_to < min(end, duration) - 0.05:
        raise InputError(path, "audio data", f"samples up to {min(end, duration):.3f} s (the "
                         "header's declared length)", found=f"data ends at {decoded_to:.3f} s (truncated?)")
    if notes is not None:
        if src_rate and src_rate != sr:
            notes.append(f"{name}: resampled {src_rate} Hz -> {sr} Hz")
        if channels and channels > 1:
            notes.append(f"{name}: mixed {channels} channels to mono")
        if n < cfg.n_samples:
            notes.append(f"{name}: {n / sr:.3f} s of audio padded with silence to {cfg.duration_s:g} s")
        elif not ran_out and (duration is None
                              or duration - start > cfg.duration_s + cfg.hop / sr):
            # Only a real crop is worth a line in the report: a file of exactly the configured
            # length also stops the decode early (the buffer is full), but loses nothing.
            notes.append(f"{name}: cropped to {cfg.duration_s:g} s from {start:g} s")
    return out


def _check_wav_length(path) -> None:
    """FFmpeg's wav demuxer trusts the file size over the header, so a cut-short wav decodes
    without complaint; compare the RIFF `data` chunk's declared size with the bytes present.
    Streaming writers that leave the size 0 or 0xFFFFFFFF are not judged."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(0, 2)
            size = f.tell()
    except OSError:
        return
    off = 12
    while off + 8 <= len(head):
        cid, clen = head[off:off + 4], int.from_bytes(head[off + 4:off + 8], "little")
        if cid == b"data":
            if 0 < clen < 0xFFFFFFFF and off + 8 + clen > size:
                raise InputError(path, "audio data", f"{clen} bytes of samples (the RIFF data "
                                 "chunk size)", found=f"{size - off - 8} bytes (truncated?)")
            return
        off += 8 + clen + (clen & 1)


def log_mel(path: str | Path, cfg: AudioConfig, segment: tuple[float, float] | None = None,
            notes: list[str] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (1, cfg.n_mels, cfg.n_frames) log-mel spectrogram of `path` (its first audio
    stream), `segment` = (start_s, end_s) or from the beginning, padded/cropped to
    cfg.duration_s. Bad input raises InputError naming the file and field."""
    return log_mel_from_samples(load_samples(path, cfg, segment, notes), cfg, out)
