"""Drawing primitives: soft-edged shapes alpha-blended into a float image, and a Gaussian blur."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class Canvas:
  """A (H, W, C) float32 image with anti-aliased shape drawing restricted to each shape's box."""

  def __init__(self, image: np.ndarray):
    self.image = image
    self.h, self.w = image.shape[:2]

  def _window(self, x0: float, x1: float, y0: float, y1: float):
    ix0, ix1 = max(int(math.floor(x0)) - 1, 0), min(int(math.ceil(x1)) + 2, self.w)
    iy0, iy1 = max(int(math.floor(y0)) - 1, 0), min(int(math.ceil(y1)) + 2, self.h)
    if ix0 >= ix1 or iy0 >= iy1:
      return None
    ys = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
    return slice(iy0, iy1), slice(ix0, ix1), ys, xs

  def _blend(self, window, alpha: np.ndarray, value: np.ndarray) -> None:
    region = self.image[window[0], window[1]]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * value

  def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: np.ndarray) -> None:
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    window = self._window(cx - rx, cx + rx, cy - ry, cy + ry)
    if window is None:
      return
    _, _, ys, xs = window
    d = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    self._blend(window, np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0), value)

  def capsule(self, a: Sequence[float], b: Sequence[float], r0: float, r1: float,
              value: np.ndarray) -> None:
    """A segment from a to b whose radius goes from r0 to r1 (limbs)."""
    r = max(r0, r1)
    window = self._window(min(a[0], b[0]) - r, max(a[0], b[0]) + r, min(a[1], b[1]) - r,
                          max(a[1], b[1]) + r)
    if window is None:
      return
    _, _, ys, xs = window
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((xs - a[0]) * dx + (ys - a[1]) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    dist = np.sqrt((xs - a[0] - t * dx) ** 2 + (ys - a[1] - t * dy) ** 2)
    self._blend(window, np.clip(r0 + t * (r1 - r0) - dist + 0.5, 0.0, 1.0), value)

  def polygon(self, points: Sequence[Sequence[float]], value: np.ndarray) -> None:
    """A convex polygon (vertices in either orientation)."""
    pts = np.asarray(points, dtype=np.float32)
    window = self._window(pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
    if window is None:
      return
    _, _, ys, xs = window
    nxt = np.roll(pts, -1, axis=0)
    area = float(np.sum(pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1]))
    sign = 1.0 if area > 0 else -1.0
    inside = None
    for (x0, y0), (x1, y1) in zip(pts, nxt):
      length = math.hypot(x1 - x0, y1 - y0)
      if length < 1e-6:
        continue
      d = sign * ((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)) / length
      inside = d if inside is None else np.minimum(inside, d)
    if inside is not None:
      self._blend(window, np.clip(inside + 0.5, 0.0, 1.0), value)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of a (H, W, C) image with reflected borders."""
  if sigma < 0.3:
    return image
  radius = max(1, int(math.ceil(2.5 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)
  for axis in (0, 1):
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="reflect")
    n = image.shape[axis]
    out = np.zeros_like(image)
    for k, w in enumerate(taps):
      out += w * np.take(padded, np.arange(k, k + n), axis=axis)
    image = out
  return image


