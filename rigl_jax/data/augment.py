"""Vectorised numpy preprocessing for the in-memory datasets.

Augmentation is split in two: `sample` draws the random parameters for a whole
*global* batch from one numpy Generator, `apply` transforms the local rows.
Drawing for the global batch means the augmentation of an example does not
depend on how many processes share the batch.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Per-channel statistics, in [0, 1] pixel units: fixed constants, so normalisation
# does not depend on validation_size. CIFAR's are the report's code's (rigl-
# reproducibility `data.py` l.56 and l.89); its CIFAR-10 std (0.2023, ...) is the
# widely copied one, not the data's (0.2470, ...). The authors' TF code
# standardises each image instead (`rigl/cifar_resnet/data_helper.py`).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
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
  """Reflect-pad `pad` pixels, random crop back to the input size, random h-flip.

  The report's CIFAR-10 augmentation: torchvision's `Pad(4, padding_mode=
  "reflect")`, `RandomCrop(32)`, `RandomHorizontalFlip()` (rigl-reproducibility
  `data.py` l.60-62). numpy's "reflect" is torchvision's (the edge pixel is not
  repeated). The authors' TF code mirrors the border with the edge pixel
  repeated (google-research/rigl `rigl/cifar_resnet/data_helper.py` l.40-43,
  numpy's "symmetric"); `mode` selects either, or "constant" (zeros).
  """

  pad: int = 4
  mode: str = "reflect"

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
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=self.mode)
    rows = params["dy"][:, None] + np.arange(h)  # [n, h]
    cols = params["dx"][:, None] + np.arange(w)  # [n, w]
    # A flip reverses the columns of the crop window.
    cols = np.where(params["flip"][:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclasses.dataclass(frozen=True)
class ResizedCropFlip:
  """torchvision's `RandomResizedCrop(size)` + `RandomHorizontalFlip()`, vectorised.

  The report's CIFAR-100 augmentation (rigl-reproducibility `data.py` l.93-94):
  a box of area `uniform(scale) * H * W` and aspect ratio `exp(uniform(log
  ratio))`, at a uniform position, resized bilinearly (half-pixel centres) to
  the input size. As in torchvision, up to 10 draws are tried per image and the
  first that fits is used; if none fits, the central crop of the closest
  allowed ratio. Output pixels are rounded back to uint8, as PIL does.
  """

  size: tuple[int, int] = (32, 32)   # (height, width) of input and output
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  attempts: int = 10

  def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Crop boxes (top, left, h, w) and flip flags for `n` images."""
    height, width = self.size
    area = height * width
    shape = (n, self.attempts)
    target = area * rng.uniform(self.scale[0], self.scale[1], size=shape)
    log_ratio = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), size=shape)
    aspect = np.exp(log_ratio)
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=1)
    any_fit = fits[np.arange(n), first]
    h, w = h[np.arange(n), first], w[np.arange(n), first]
    # torchvision's fallback: the central crop of the closest allowed ratio.
    in_ratio = width / height
    if in_ratio < self.ratio[0]:
      fb_w, fb_h = width, int(round(width / self.ratio[0]))
    elif in_ratio > self.ratio[1]:
      fb_h, fb_w = height, int(round(height * self.ratio[1]))
    else:
      fb_h, fb_w = height, width
    h, w = np.where(any_fit, h, fb_h), np.where(any_fit, w, fb_w)
    top = np.floor(rng.random(n) * (height - h + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (width - w + 1)).astype(np.int64)
    top = np.where(any_fit, top, (height - h) // 2)
    left = np.where(any_fit, left, (width - w) // 2)
    return {"top": top, "left": left, "h": h, "w": w, "flip": rng.random(n) < 0.5}

  def apply(self, images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """`images` [n, h, w, c] uint8 with `params` for the same n rows."""
    n, height, width, _ = images.shape
    if (height, width) != tuple(self.size):
      raise ValueError(f"ResizedCropFlip of size {self.size} got images of {(height, width)}")
    top, left = params["top"][:, None], params["left"][:, None]
    box_h, box_w = params["h"][:, None], params["w"][:, None]
    # Half-pixel centres: output pixel i samples the box at (i + 0.5) * h / H - 0.5.
    ys = top + np.clip((np.arange(height) + 0.5) * box_h / height - 0.5, 0, box_h - 1)
    xs = left + np.clip((np.arange(width) + 0.5) * box_w / width - 0.5, 0, box_w - 1)
    xs = np.where(params["flip"][:, None], xs[:, ::-1], xs)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, top + box_h - 1)
    x1 = np.minimum(x0 + 1, left + box_w - 1)
    wy = (ys - y0)[:, :, None, None]
    wx = (xs - x0)[:, None, :, None]
    b = np.arange(n)[:, None, None]
    img = images.astype(np.float32)

    def at(yy, xx):
      return img[b, yy[:, :, None], xx[:, None, :]]

    top_row = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom_row = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    out = top_row * (1 - wy) + bottom_row * wy
    return np.clip(np.round(out), 0, 255).astype(images.dtype)


# Train augmentations by config name; "default" is each dataset's reference choice.
AUGMENTATIONS = ("default", "none", "pad_crop_flip", "resized_crop_flip")


def get_augmentation(name: str, dataset: str, input_shape: tuple[int, ...]):
  """The augmentation called `name` for `dataset` (None: no augmentation).

  "default" is the report's choice: pad-crop-flip on CIFAR-10, resized-crop-flip
  on CIFAR-100 (rigl-reproducibility `data.py` l.58-62 and l.91-94), none on
  the MNIST sets.
  """
  if name not in AUGMENTATIONS:
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {name!r}")
  if name == "default":
    name = {"cifar10": "pad_crop_flip", "cifar100": "resized_crop_flip"}.get(dataset, "none")
  if name == "none":
    return None
  if len(input_shape) != 3:
    raise ValueError(f"augmentation {name!r} needs images; dataset {dataset!r} has inputs "
                     f"of shape {tuple(input_shape)}")
  if name == "pad_crop_flip":
    return PadCropFlip(pad=4)
  return ResizedCropFlip(size=tuple(input_shape[:2]))
