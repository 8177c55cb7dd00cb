"""Images of simple scenes with captions that describe them: the embedded image-caption data.

A scene is one or two shapes (shape, colour, size) in distinct cells of a 3x3 grid over a plain or lightly
textured background. Rendering is exact (no anti-aliasing): every pixel of a shape has its colour, so a test
can read the caption back from the pixels, and a classifier can be trained on `attributes`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # name -> RGB in [0, 1]; none is close to a background
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = ((0.5, 0.5, 0.5), (0.35, 0.4, 0.45), (0.55, 0.5, 0.4))  # greys and a sand
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.26, "large": 0.44}  # half-extent in units of a grid cell
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")  # row-major over the 3x3 grid
_PLACE = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
          "left": "on the left", "centre": "in the centre", "right": "on the right",
          "bottom left": "at the bottom left", "bottom": "at the bottom",
          "bottom right": "at the bottom right"}
TEXTURE_AMPLITUDE = 0.04
MIN_IMAGE_SIZE = 12  # below this a small shape covers too few pixels to be told apart


@dataclasses.dataclass(frozen=True)
class Shape:
  shape: str
  colour: str
  size: str
  position: str


@dataclasses.dataclass(frozen=True)
class Scene:
  shapes: tuple[Shape, ...]
  background: int   # index into BACKGROUNDS
  textured: bool    # faint diagonal stripes instead of a plain background


def _check_size(image_size: int) -> None:
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} is too small for the scenes (at least {MIN_IMAGE_SIZE})")


def sample_scenes(n: int, seed: int, image_size: int = 32) -> list[Scene]:
  """`n` scenes drawn from rng(seed): 1-2 shapes in distinct cells, uniform attributes."""
  _check_size(image_size)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    count = int(rng.integers(1, 3))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    shapes = tuple(Shape(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                         SIZES[rng.integers(len(SIZES))], POSITIONS[c]) for c in sorted(cells))
    out.append(Scene(shapes, int(rng.integers(len(BACKGROUNDS))), bool(rng.integers(2))))
  return out


def caption(scene: Scene) -> str:
  """'a small red circle at the top left and a large blue square in the centre'."""
  return " and ".join(f"a {s.size} {s.colour} {s.shape} {_PLACE[s.position]}" for s in scene.shapes)


def shape_centre(shape: Shape, image_size: int) -> tuple[float, float]:
  """(row, column) in pixels of the centre of `shape`'s grid cell."""
  row, col = divmod(POSITIONS.index(shape.position), 3)
  cell = image_size / 3
  return (row + 0.5) * cell, (col + 0.5) * cell


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
  """bool [H, W]: the pixels (by their centres) that `shape` covers."""
  cy, cx = shape_centre(shape, image_size)
  r = SIZE_RADIUS[shape.size] * image_size / 3
  y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
  dy, dx = (y - cy) / r, (x - cx) / r
  if shape.shape == "circle":
    return dy**2 + dx**2 <= 1.0
  if shape.shape == "square":
    return (np.abs(dy) <= 0.85) & (np.abs(dx) <= 0.85)
  if shape.shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= 1.0
  if shape.shape == "triangle":  # apex up, base at dy = 0.8; width grows linearly from the apex
    return (dy >= -1.0) & (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) / 1.8)
  raise ValueError(f"unknown shape {shape.shape!r}")


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
  """f32 [H, W, 3] in [-1, 1]."""
  _check_size(image_size)
  image = np.empty((image_size, image_size, 3), np.float32)
  image[:] = BACKGROUNDS[scene.background]
  if scene.textured:
    y, x = np.mgrid[0:image_size, 0:image_size]
    image += np.where((x + y) % 4 < 2, TEXTURE_AMPLITUDE, -TEXTURE_AMPLITUDE)[..., None].astype(np.float32)
  for s in scene.shapes:
    image[shape_mask(s, image_size)] = COLOURS[s.colour]
  return image * 2.0 - 1.0


def render_batch(scenes: list[Scene], image_size: int = 32) -> np.ndarray:
  """f32 [N, H, W, 3] in [-1, 1]."""
  out = np.empty((len(scenes), image_size, image_size, 3), np.float32)
  for i, scene in enumerate(scenes):
    out[i] = render(scene, image_size)
  return out


MAX_SHAPES = 2
ATTRIBUTES = ("shape", "colour", "size", "position")
_VALUES = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS}


def attributes(scenes: list[Scene]) -> np.ndarray:
  """int32 [N, MAX_SHAPES, 4]: per shape the index of its shape, colour, size and position (ATTRIBUTES
  order, each into its tuple above); -1 where a scene has fewer shapes. Labels for probes/classifiers."""
  out = np.full((len(scenes), MAX_SHAPES, len(ATTRIBUTES)), -1, np.int32)
  for i, scene in enumerate(scenes):
    for j, s in enumerate(scene.shapes):
      out[i, j] = [_VALUES[a].index(getattr(s, a)) for a in ATTRIBUTES]
  return out
