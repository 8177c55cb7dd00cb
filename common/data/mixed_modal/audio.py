"""Synthetic speech: words as tone patterns, and a small learned quantiser that turns clips into tokens.

The MoT paper's speech setting (sec. 3.1) trains on discrete speech tokens next to text and image tokens. Here
every word of a small lexicon (digits and the scene words) is a fixed pair of tones; a clip is a transcript
spoken word by word at a low sample rate, with random loudness, slight detuning and noise. The quantiser is
k-means over per-frame log-magnitude spectra (the classic vector-quantised front end): one code per frame.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from common.data.mixed_modal import scenes

SAMPLE_RATE = 4000
FRAME = 64                       # samples per frame (16 ms): one token per frame
TONE_FRAMES, GAP_FRAMES = 2, 1   # a word = tone A, tone B, silence
FRAMES_PER_WORD = 2 * TONE_FRAMES + GAP_FRAMES
_TONE_BINS = (5, 8, 11, 14, 17, 20, 23, 26)  # FFT bins of the frame (62.5 Hz apart): 312 .. 1625 Hz
DIGITS = tuple(str(d) for d in range(10))
LEXICON = tuple(dict.fromkeys(
    DIGITS + scenes.SHAPES + scenes.COLOUR_NAMES + scenes.SIZES
    + ("a", "and", "at", "in", "on", "the", "top", "bottom", "left", "right", "centre")))


def word_tones(word: str) -> tuple[float, float]:
  """The two frequencies (Hz) of `word`: distinct ordered pairs of tone bins, one pair per lexicon word."""
  if word not in LEXICON:
    raise ValueError(f"word {word!r} is not in the audio lexicon")
  pairs = [(a, b) for a in _TONE_BINS for b in _TONE_BINS if a != b]
  a, b = pairs[LEXICON.index(word)]
  return a * SAMPLE_RATE / FRAME, b * SAMPLE_RATE / FRAME


def speak(transcript: str, rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
  """f32 [samples] clip of `transcript` (space-separated lexicon words): one silent frame, then each word."""
  words = transcript.split()
  clip = np.zeros((1 + FRAMES_PER_WORD * len(words)) * FRAME, np.float32)
  t = np.arange(TONE_FRAMES * FRAME) / SAMPLE_RATE
  start = FRAME
  for word in words:
    for freq in word_tones(word):
      detune = 1.0 + rng.uniform(-0.01, 0.01)
      amplitude = rng.uniform(0.3, 0.8)
      phase = rng.uniform(0, 2 * np.pi)
      clip[start:start + len(t)] = amplitude * np.sin(2 * np.pi * freq * detune * t + phase)
      start += len(t)
    start += GAP_FRAMES * FRAME
  return clip + noise * rng.standard_normal(clip.shape).astype(np.float32)


def sample_transcripts(n: int, rng: np.random.Generator) -> list[str]:
  """Half digit strings ('3 0 7 1'), half one-shape scene phrases ('a large red circle on the left')."""
  out = []
  for _ in range(n):
    if rng.integers(2):
      out.append(" ".join(DIGITS[d] for d in rng.integers(0, 10, size=int(rng.integers(3, 7)))))
    else:
      shape = scenes.sample_scenes(1, int(rng.integers(2**31)))[0].shapes[0]
      out.append(scenes.caption(scenes.Scene((shape,), 0, False)))
  return out


def frame_features(clip: np.ndarray) -> np.ndarray:
  """f32 [frames, FRAME // 2 + 1]: log(1 + |spectrum|) of each Hann-windowed frame (the +1 floors the
  noise bins, so frames differ by their tones, not by the noise)."""
  n = len(clip) // FRAME
  frames = clip[:n * FRAME].reshape(n, FRAME) * np.hanning(FRAME).astype(np.float32)
  return np.log1p(np.abs(np.fft.rfft(frames, axis=-1))).astype(np.float32)


def _assign(features: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(nearest centroid index int32 [N], squared distance to it [N])."""
  d2 = (np.sum(features**2, 1, keepdims=True) - 2 * features @ centroids.T + np.sum(centroids**2, 1)[None])
  codes = np.argmin(d2, axis=1).astype(np.int32)
  return codes, np.maximum(d2[np.arange(len(features)), codes], 0.0)


@dataclasses.dataclass
class AudioTokenizer:
  """k-means codebook over frame features: `encode` maps each 16 ms frame to its nearest centroid."""
  centroids: np.ndarray  # f32 [codebook_size, feature_dim]

  @property
  def codebook_size(self) -> int:
    return int(self.centroids.shape[0])

  @staticmethod
  def fit(clips: list[np.ndarray], codebook_size: int = 64, *, iterations: int = 25, seed: int = 0
          ) -> "AudioTokenizer":
    """Lloyd's k-means from `codebook_size` distinct frames drawn with rng(seed); an emptied cluster is
    re-seeded with the frame farthest from its centroid."""
    features = np.concatenate([frame_features(c) for c in clips]).astype(np.float64)
    if len(features) < codebook_size:
      raise ValueError(f"{len(features)} frames cannot fit a codebook of {codebook_size}")
    rng = np.random.default_rng(seed)
    centroids = features[rng.choice(len(features), codebook_size, replace=False)].copy()
    for _ in range(iterations):
      codes, d2 = _assign(features, centroids)
      counts = np.bincount(codes, minlength=codebook_size)
      sums = np.zeros_like(centroids)
      np.add.at(sums, codes, features)
      filled = counts > 0
      centroids[filled] = sums[filled] / counts[filled, None]
      for k in np.flatnonzero(~filled):
        far = int(np.argmax(d2))
        centroids[k] = features[far]
        d2[far] = 0.0
    return AudioTokenizer(centroids.astype(np.float32))

  def distortion(self, clips: list[np.ndarray]) -> float:
    """Mean squared distance of each frame's features to its code's centroid."""
    features = np.concatenate([frame_features(c) for c in clips])
    return float(np.mean(_assign(features, self.centroids)[1]))

  def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
    """One int32 [frames] code array per clip."""
    return [_assign(frame_features(c), self.centroids)[0] for c in clips]

  def save(self, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, centroids=self.centroids, sample_rate=SAMPLE_RATE, frame=FRAME)
    os.replace(tmp, path)

  @staticmethod
  def load(path: str) -> "AudioTokenizer":
    with np.load(path) as z:
      if int(z["sample_rate"]) != SAMPLE_RATE or int(z["frame"]) != FRAME:
        raise ValueError(f"{path}: an audio tokenizer for another sample rate or frame length")
      return AudioTokenizer(z["centroids"].astype(np.float32))


def default_audio_tokenizer(cache_dir: str, codebook_size: int = 64, *, seed: int = 0,
                            n_clips: int = 400) -> AudioTokenizer:
  """The tokenizer fitted on `n_clips` generated clips, cached under `cache_dir` keyed by its settings."""
  settings = dict(codebook_size=codebook_size, seed=seed, n_clips=n_clips, sample_rate=SAMPLE_RATE,
                  frame=FRAME, lexicon=LEXICON, tones=_TONE_BINS, version=1)
  key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:16]
  path = os.path.join(os.path.expanduser(cache_dir), f"audio-tokenizer-{key}.npz")
  if os.path.exists(path):
    return AudioTokenizer.load(path)
  rng = np.random.default_rng((seed, 7))
  clips = [speak(t, rng) for t in sample_transcripts(n_clips, rng)]
  tokenizer = AudioTokenizer.fit(clips, codebook_size, seed=seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tokenizer.save(path)
  return tokenizer
