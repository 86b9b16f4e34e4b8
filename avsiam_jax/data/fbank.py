"""Kaldi-compatible log mel filterbank ("fbank"), as AVSiam / CAV-MAE compute it.

Matches torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True,
sample_frequency=16000, use_energy=False, window_type='hanning',
num_mel_bins=128, dither=0.0, frame_shift=10) on a mean-removed waveform.
Other settings are the Kaldi defaults: 25 ms frames, snip_edges, DC removal per
frame, preemphasis 0.97, FFT size rounded up to a power of two, power spectrum,
mel bins over [20 Hz, Nyquist], log of max(energy, float32 eps).

Two paths share the window and mel matrix (built once in numpy, cached): `fbank` (numpy, one
waveform; what data_prep stores) and `fbank_jax` (batched and jittable, for computing features
on the accelerator from raw waveforms in a pipeline of one's own). Model inputs are made from a
stored fbank by the eval pipeline's `pipeline.eval_audio` (pad or cut, then normalize).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

FBANK_MEAN = -5.081
FBANK_STD = 4.4849
NUM_MEL_BINS = 128
SAMPLE_RATE = 16000

_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0
_PREEMPHASIS = 0.97
_LOW_FREQ = 20.0
# torch.finfo(torch.float32).eps: the floor Kaldi/torchaudio apply before the log.
_LOG_FLOOR = float(np.finfo(np.float32).eps)

__all__ = [
    "FBANK_MEAN",
    "FBANK_STD",
    "NUM_MEL_BINS",
    "SAMPLE_RATE",
    "fbank",
    "fbank_jax",
    "pad_or_cut",
    "normalize",
]


class _Setup(NamedTuple):
  window_size: int  # samples per frame
  window_shift: int  # samples between frame starts
  fft_size: int  # window_size rounded up to a power of two
  window: np.ndarray  # (window_size,) float32
  mel_matrix: np.ndarray  # (fft_size // 2 + 1, num_mel_bins) float32


def _check_params(sample_rate, num_mel_bins) -> None:
  if (isinstance(sample_rate, bool)
      or not isinstance(sample_rate, (int, float, np.integer, np.floating))):
    raise ValueError(f"sample_rate must be a number, got {sample_rate!r}")
  if not np.isfinite(sample_rate) or sample_rate <= 0:
    raise ValueError(f"sample_rate must be positive, got {sample_rate!r}")
  if (isinstance(num_mel_bins, bool) or not isinstance(num_mel_bins, (int, np.integer))
      or num_mel_bins < 1):
    raise ValueError(f"num_mel_bins must be a positive integer, got {num_mel_bins!r}")


def _setup(sample_rate, num_mel_bins) -> _Setup:
  # Validate before the cache: unhashable or bad arguments get a ValueError.
  _check_params(sample_rate, num_mel_bins)
  return _setup_cached(float(sample_rate), int(num_mel_bins))


@functools.lru_cache(maxsize=16)
def _setup_cached(sample_rate: float, num_mel_bins: int) -> _Setup:
  # Same expression (and float rounding) as torchaudio's window size computation.
  window_size = int(sample_rate * _FRAME_LENGTH_MS * 0.001)
  window_shift = int(sample_rate * _FRAME_SHIFT_MS * 0.001)
  if window_size < 2 or window_shift < 1:
    raise ValueError(f"sample_rate {sample_rate!r} is too low for a 25 ms window / 10 ms shift")
  nyquist = 0.5 * sample_rate
  if _LOW_FREQ >= nyquist:
    raise ValueError(f"sample_rate {sample_rate!r} is too low: Nyquist must exceed "
                     f"low_freq={_LOW_FREQ} Hz")
  fft_size = 1 << (window_size - 1).bit_length()

  # Window and mel weights are built in float32 with torchaudio's operation order,
  # so they round like the reference (float64 weights leave a ~5e-5 log bias on
  # the low bands that cover a single FFT bin).
  f32 = np.float32
  # Kaldi 'hanning' is the symmetric Hann window, 0.5 - 0.5*cos(2*pi*n/(N-1)).
  n = np.arange(window_size, dtype=f32)
  window = f32(0.5) - f32(0.5) * np.cos(n * f32(2.0 * np.pi / (window_size - 1)))

  # Triangles equally spaced in HTK mel (1127*ln(1+f/700)) between low_freq and
  # Nyquist, evaluated at the mel of FFT bins 0..fft_size/2-1; the Nyquist bin
  # gets weight 0 (torchaudio pads the matrix with a zero column there).
  def mel(freq):
    return f32(1127.0) * np.log(f32(1.0) + freq / f32(700.0))

  mel_low = 1127.0 * np.log(1.0 + _LOW_FREQ / 700.0)
  mel_high = 1127.0 * np.log(1.0 + nyquist / 700.0)
  delta = f32((mel_high - mel_low) / (num_mel_bins + 1))
  b = np.arange(num_mel_bins, dtype=f32)[:, None]
  left = f32(mel_low) + b * delta
  center = f32(mel_low) + (b + f32(1.0)) * delta
  right = f32(mel_low) + (b + f32(2.0)) * delta
  bin_mel = mel(f32(sample_rate / fft_size) * np.arange(fft_size // 2, dtype=f32))[None, :]
  up = (bin_mel - left) / (center - left)
  down = (right - bin_mel) / (right - center)
  banks = np.maximum(f32(0.0), np.minimum(up, down))  # (num_mel_bins, fft_size/2)
  mel_matrix = np.zeros((fft_size // 2 + 1, num_mel_bins), dtype=f32)
  mel_matrix[:-1] = banks.T

  # Cached and shared: keep callers from mutating them.
  window.setflags(write=False)
  mel_matrix.setflags(write=False)
  return _Setup(window_size, window_shift, fft_size, window, mel_matrix)


def _num_frames(num_samples: int, s: _Setup) -> int:
  return 1 + (num_samples - s.window_size) // s.window_shift


def fbank(waveform, sample_rate=SAMPLE_RATE, num_mel_bins=NUM_MEL_BINS) -> np.ndarray:
  """Log mel filterbank of one waveform.

  waveform: 1-D float array in [-1, 1] (e.g. PCM16 / 32768). Its mean is removed here.
  Returns (T, num_mel_bins) float32 with T = 1 + (N - window) // shift
  (T = 998 for 10 s at 16 kHz).
  """
  s = _setup(sample_rate, num_mel_bins)
  x = np.asarray(waveform)
  if x.ndim != 1:
    raise ValueError(f"waveform must be 1-D (mono samples), got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    # Integer PCM would silently shift every log energy by ~2*ln(32768).
    raise ValueError("waveform must be floating point in [-1, 1] (e.g. PCM16 / 32768), "
                     f"got dtype {x.dtype}")
  if x.shape[0] < s.window_size:
    raise ValueError(
        f"waveform too short: {x.shape[0]} samples, need at least one 25 ms window "
        f"({s.window_size} samples at sample_rate {sample_rate})"
    )
  # float32 throughout, like the torch reference: its rounding is then shared
  # rather than added, and it is about twice as fast as float64.
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("waveform contains non-finite values (NaN or Inf, or beyond float32 range)")
  x = x - np.float32(x.mean(dtype=np.float64))

  t = _num_frames(x.shape[0], s)
  frames = np.lib.stride_tricks.sliding_window_view(x, s.window_size)[
      : (t - 1) * s.window_shift + 1 : s.window_shift]
  frames = frames - frames.mean(axis=1, keepdims=True)  # DC removal; also copies the read-only view
  # Preemphasis; Kaldi uses the frame's own first sample as its predecessor.
  frames[:, 1:] -= np.float32(_PREEMPHASIS) * frames[:, :-1].copy()
  frames[:, 0] -= np.float32(_PREEMPHASIS) * frames[:, 0]
  frames *= s.window
  spec = np.fft.rfft(frames, n=s.fft_size, axis=1)  # complex64: numpy >= 2 keeps float32
  power = spec.real**2 + spec.imag**2
  mel = power @ s.mel_matrix
  return np.log(np.maximum(mel, np.float32(_LOG_FLOOR))).astype(np.float32, copy=False)


def _fbank_jax_impl(waveforms, sample_rate, num_mel_bins):
  import jax  # here, not at the top: data_prep workers use the numpy path without jax
  import jax.numpy as jnp

  s = _setup(sample_rate, num_mel_bins)
  t = _num_frames(waveforms.shape[1], s)
  x = waveforms.astype(jnp.float32)
  x = x - jnp.mean(x, axis=1, keepdims=True)
  idx = np.arange(t)[:, None] * s.window_shift + np.arange(s.window_size)[None, :]
  frames = x[:, idx]  # (B, T, window)
  frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
  prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
  frames = (frames - _PREEMPHASIS * prev) * jnp.asarray(s.window, jnp.float32)
  spec = jnp.fft.rfft(frames, n=s.fft_size, axis=-1)
  power = jnp.square(spec.real) + jnp.square(spec.imag)
  # HIGHEST: avoid TF32/bf16 matmuls on accelerators, which visibly shift the log.
  mel = jnp.matmul(power, jnp.asarray(s.mel_matrix, jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, _LOG_FLOOR))


@functools.cache
def _fbank_jax_jitted():
  import jax

  return jax.jit(_fbank_jax_impl, static_argnames=("sample_rate", "num_mel_bins"))


def fbank_jax(waveforms, sample_rate=SAMPLE_RATE, num_mel_bins=NUM_MEL_BINS):
  """Batched, jitted fbank: (B, N) float waveforms in [-1, 1] -> (B, T, num_mel_bins) float32.

  Each row's mean is removed inside. Shapes are checked at trace time; non-finite
  values are not checked (they would need a host sync) and propagate as NaN.
  """
  import jax.numpy as jnp

  s = _setup(sample_rate, num_mel_bins)
  if not hasattr(waveforms, "dtype"):
    waveforms = np.asarray(waveforms)
  shape = jnp.shape(waveforms)
  if len(shape) != 2:
    raise ValueError(f"waveforms must be 2-D (batch, samples), got shape {shape}")
  if not jnp.issubdtype(waveforms.dtype, jnp.floating):
    raise ValueError(
        "waveforms must be floating point in [-1, 1] (e.g. PCM16 / 32768), "
        f"got dtype {waveforms.dtype}"
    )
  if shape[1] < s.window_size:
    raise ValueError(
        f"waveforms too short: {shape[1]} samples, need at least one 25 ms window "
        f"({s.window_size} samples at sample_rate {sample_rate})"
    )
  return _fbank_jax_jitted()(waveforms, sample_rate=sample_rate, num_mel_bins=num_mel_bins)


def pad_or_cut(fbank, num_frames=1024) -> np.ndarray:
  """Zero-pad or cut at the end along time (axis 0) to exactly num_frames."""
  x = np.asarray(fbank)
  if x.ndim != 2:
    raise ValueError(f"fbank must be 2-D (frames, bins), got shape {x.shape}")
  if num_frames < 1:
    raise ValueError(f"num_frames must be positive, got {num_frames}")
  t = x.shape[0]
  if t >= num_frames:
    return x[:num_frames]
  return np.pad(x, ((0, num_frames - t), (0, 0)))


def normalize(fbank):
  """AVSiam / CAV-MAE AudioSet normalization: (x - mean) / std."""
  return (fbank - FBANK_MEAN) / FBANK_STD
