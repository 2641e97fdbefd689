"""Audio modality: decoding any PyAV audio to fixed-length mono, our log-mel against librosa,
and bad input. Real recordings ($MMFEED_REAL_DATA, producer/synth.py REAL_DIR) are used when
present."""
from __future__ import annotations

from pathlib import Path
import wave

import av
import numpy as np
import pytest

from producer.modalities import audio
from producer.synth import REAL_DIR
from protocol.errors import InputError

REAL = REAL_DIR
JFK = REAL / "jfk_speech_16k_mono.wav"
ALSA = REAL / "alsa_Front_Center.wav"
CAR = REAL / "intel_car-detection.mp4"
WALK = REAL / "person_walk_5s_384x216_h264.mp4"
CFG = audio.AudioConfig()


def real(p: Path) -> Path:
    if not p.exists():
        pytest.skip(f"real recording {p} not present")
    return p


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """int16 wav (channels last) with the stdlib writer: an independent encoder."""
    x = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.astype("<i2").tobytes())
    return path


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (10000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


# --- shapes and notes ---------------------------------------------------------------------


def test_log_mel_has_fixed_shape_for_a_config():
    out = audio.log_mel(real(JFK), CFG)
    assert out.shape == (1, CFG.n_mels, CFG.n_frames) == (1, 64, 101) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_other_rate_is_resampled_and_said_so():
    notes: list[str] = []
    out = audio.log_mel(real(ALSA), CFG, notes=notes)
    assert out.shape == (1, 64, 101)
    assert "alsa_Front_Center.wav: resampled 48000 Hz -> 16000 Hz" in notes


def test_resampling_keeps_the_pitch(tmp_path):
    # A 1 kHz tone at 44.1 kHz, resampled to 16 kHz, still peaks at 1 kHz.
    x = audio.load_samples(write_wav(tmp_path / "t.wav", tone(1000, 1.0, 44100), 44100), CFG)
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * CFG.sample_rate / len(x) - 1000) <= 2


def test_stereo_is_mixed_to_mono_and_said_so(tmp_path):
    st = np.stack([tone(440, 1.0, 16000), tone(440, 1.0, 16000)], axis=1)
    notes: list[str] = []
    x = audio.load_samples(write_wav(tmp_path / "st.wav", st, 16000), CFG, notes=notes)
    assert x.shape == (16000,) and any("mixed 2 channels to mono" in n for n in notes)
    assert np.abs(x).max() > 0.1


def test_short_audio_is_zero_padded_and_said_so(tmp_path):
    notes: list[str] = []
    x = audio.load_samples(write_wav(tmp_path / "s.wav", tone(440, 0.25, 16000), 16000), CFG, notes=notes)
    assert x.shape == (16000,) and np.all(x[4000:] == 0) and np.abs(x[:4000]).max() > 0.1
    assert any("padded with silence" in n for n in notes)


def test_exact_length_audio_is_not_reported_as_cropped(tmp_path):
    # A file of exactly the configured length loses nothing; a note would be noise in every
    # preprocess report (the synthetic demo dataset is made of such files).
    cfg = audio.AudioConfig()
    p = write_wav(tmp_path / "exact.wav", tone(440, cfg.duration_s, cfg.sample_rate), cfg.sample_rate)
    notes: list[str] = []
    audio.log_mel(p, cfg, notes=notes)
    assert notes == []


def test_longer_audio_is_cropped_and_said_so(tmp_path):
    cfg = audio.AudioConfig()
    p = write_wav(tmp_path / "long.wav", tone(440, 2 * cfg.duration_s, cfg.sample_rate), cfg.sample_rate)
    notes: list[str] = []
    audio.log_mel(p, cfg, notes=notes)
    assert any("cropped" in n for n in notes)


def test_segment_window_starts_at_its_start(tmp_path):
    # 0..1 s silence, 1..2 s tone: the window (1.0, 2.0) is all tone, (0.0, 0.5) all silence.
    x = np.concatenate([np.zeros(16000, np.int16), tone(440, 1.0, 16000)])
    p = write_wav(tmp_path / "seg.wav", x, 16000)
    on = audio.load_samples(p, CFG, segment=(1.0, 2.0))
    off = audio.load_samples(p, CFG, segment=(0.0, 0.5))
    assert np.allclose(on, tone(440, 1.0, 16000) / 32768, atol=1e-3)  # sample-exact start
    assert np.abs(off).max() == 0


def test_aac_track_of_an_mp4_is_read():
    notes: list[str] = []
    out = audio.log_mel(real(CAR), CFG, segment=(5.0, 6.0), notes=notes)
    assert out.shape == (1, 64, 101)
    assert any("48000 Hz -> 16000 Hz" in n for n in notes) and any("2 channels" in n for n in notes)


# --- the spectrogram ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, audio.AudioConfig(sample_rate=22050, n_fft=1024, hop=256,
                                                        n_mels=80, duration_s=0.5)])
def test_mel_power_matches_librosa(cfg):
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cfg.n_samples).astype(np.float32)
    ref = librosa.feature.melspectrogram(y=x, sr=cfg.sample_rate, n_fft=cfg.n_fft,
                                         hop_length=cfg.hop, n_mels=cfg.n_mels, center=True,
                                         pad_mode="constant", power=2.0)
    got = audio.mel_power(x, cfg)
    # float32 FFT vs librosa's float32 path: relative to the largest bin, within 1e-5.
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * ref.max()


def test_log_mel_of_real_speech_matches_librosa():
    librosa = pytest.importorskip("librosa")
    x = audio.load_samples(real(JFK), CFG)
    ref = np.log(librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=160, n_mels=64,
                                                center=True, pad_mode="constant") + CFG.eps)
    # In log space: within 0.01 wherever the mel power is above the floor's neighbourhood.
    assert np.abs(audio.log_mel_from_samples(x, CFG)[0] - ref).max() < 0.01


def test_filterbank_is_built_once_per_config():
    a = audio.mel_filterbank(16000, 400, 64, 0.0, None)
    assert audio.mel_filterbank(16000, 400, 64, 0.0, None) is a and not a.flags.writeable


def test_silence_gives_the_log_floor_not_minus_infinity():
    out = audio.log_mel_from_samples(np.zeros(CFG.n_samples, np.float32), CFG)
    assert np.allclose(out, np.log(CFG.eps))


# --- bad input ----------------------------------------------------------------------------


def test_non_audio_file_is_an_input_error(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"not audio at all\n" * 64)
    with pytest.raises(InputError) as e:
        audio.log_mel(bad, CFG)
    assert e.value.field == "container" and str(bad) in str(e.value)


def test_file_without_audio_stream_is_an_input_error():
    with pytest.raises(InputError) as e:
        audio.log_mel(real(WALK), CFG)
    assert e.value.field == "audio stream" and "video" in str(e.value)


def test_empty_file_is_an_input_error(tmp_path):
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    with pytest.raises(InputError) as e:
        audio.log_mel(bad, CFG)
    assert e.value.path == str(bad)


def test_zero_length_wav_is_an_input_error(tmp_path):
    p = write_wav(tmp_path / "zero.wav", np.zeros(0, np.int16), 16000)
    with pytest.raises(InputError) as e:
        audio.log_mel(p, CFG)
    assert e.value.field == "audio samples"


def test_truncated_wav_is_an_input_error(tmp_path):
    # FFmpeg decodes a cut wav without complaint; the RIFF data size says what is missing.
    data = real(JFK).read_bytes()
    bad = tmp_path / "half.wav"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        audio.log_mel(bad, CFG)
    assert e.value.field == "audio data" and "352000 bytes" in str(e.value)


def test_truncated_aac_mp4_is_an_input_error(tmp_path):
    data = real(CAR).read_bytes()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        audio.log_mel(bad, audio.AudioConfig(duration_s=30.0))
    assert e.value.path == str(bad)


@pytest.mark.parametrize("segment", [(20.0, 21.0), (0.5, 0.2)])
def test_segment_outside_the_audio_is_an_input_error(segment):
    with pytest.raises(InputError) as e:
        audio.log_mel(real(JFK), CFG, segment=segment)
    assert e.value.field == "segment"


def test_good_file_after_a_bad_one_still_decodes(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError):
        audio.log_mel(bad, CFG)
    assert audio.log_mel(real(JFK), CFG).shape == (1, 64, 101)
