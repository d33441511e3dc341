"""Vectorised numpy preprocessing for the in-memory datasets.

Augmentation is split in two: `sample` draws the random parameters for a whole
*global* batch from one numpy Generator, `apply` transforms the local rows.
Drawing for the global batch means the augmentation of an example does not
depend on how many processes share the batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Per-channel statistics of the train sets, in [0, 1] pixel units (the usual
# published constants, so normalisation does not depend on validation_size).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclasses.dataclass(frozen=True)
class Normalize:
  """uint8 pixels -> float32 `(x / 255 - mean) / std`, per channel (last axis)."""

  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std


def as_float32(images: np.ndarray) -> np.ndarray:
  """For inputs that are already standardised (mnist1d)."""
  return images.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PadCropFlip:
  """Zero-pad `pad` pixels, random crop back to the input size, random h-flip.

  The CIFAR augmentation of the report (pad 4 + random 32x32 crop + horizontal
  flip). Padding is applied to the raw uint8 image, so padded pixels are black,
  as in torchvision's `RandomCrop(32, padding=4)` followed by `Normalize`.
  """

  pad: int = 4

  def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Crop offsets in `[0, 2 * pad]` and flip flags for `n` examples."""
    return {
        "dy": rng.integers(0, 2 * self.pad + 1, size=n),
        "dx": rng.integers(0, 2 * self.pad + 1, size=n),
        "flip": rng.random(n) < 0.5,
    }

  def apply(self, images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """`images` [n, h, w, c] with `params` for the same n rows."""
    n, h, w, _ = images.shape
    p = self.pad
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    rows = params["dy"][:, None] + np.arange(h)  # [n, h]
    cols = params["dx"][:, None] + np.arange(w)  # [n, w]
    # A flip reverses the columns of the crop window.
    cols = np.where(params["flip"][:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
