"""A deterministic stand-in for the VQ image tokenizer in the mixed-modal data tests (no training needed)."""
import numpy as np


class PatchColourTokenizer:
  """Stand-in image tokenizer: each 4x4 patch's mean colour, 4 levels per channel -> one of 64 codes."""
  codebook_size = 64

  def __init__(self, image_size):
    self.tokens_per_image = (image_size // 4) ** 2

  def encode(self, images):
    n, h, w, _ = images.shape
    means = images.reshape(n, h // 4, 4, w // 4, 4, 3).mean((2, 4))
    levels = np.clip(np.floor((means + 1) * 2), 0, 3).astype(np.int32)
    return (levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).reshape(n, -1)
