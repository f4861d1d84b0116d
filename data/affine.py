"""Affine-transformed copies of MNIST test digits: the robustness split's images.

Every transform is an affine map about the image centre (13.5, 13.5) of the 28x28 grid, drawn
by inverse mapping with bilinear interpolation and zero fill, rounded to uint8. The families and
what a magnitude means (an int, so that TFMA slices on exact values):

  identity   magnitude 0: the image itself, bit for bit (the sanity slice)
  translate  magnitude m px: an integer shift (dx, dy) with max(|dx|, |dy|) = m, one of the 8m
             such shifts (training shifts by up to 2 px per axis, so m >= 3 is new); exact,
             no interpolation
  rotate     magnitude m degrees: a rotation by +m or -m degrees
  scale      magnitude m percent: both axes scaled by m / 100
  shear      magnitude m hundredths: a horizontal shear x += ±(m / 100) * (y - 13.5)
  affine     magnitude 0: a random mix per example, in the spirit of affNIST (not affNIST,
             which is 40x40): rotation uniform in ±20 degrees, horizontal shear uniform in
             ±0.2, each axis scaled by a factor uniform in [0.8, 1.2], then a translation
             uniform in ±3 px per axis

The digit stays inside the frame: a transform is drawn on a canvas with an 8-px margin, and one
that leaves any ink in the margin is not used. The candidates are tried in an order drawn from
the example's own seed (the other sign, the other shifts of the ring, another random mix, up to
`MAX_MIX_DRAWS`); the first that keeps all ink inside is taken, and an example for which none
does is rejected (left out of the split). `transform_example` reports both.

Every candidate order comes from a seed of the example's own: (AffineSpec.seed, SHA-256 of its
pixels and label, the family, the magnitude). So the same bytes come out whatever the order in
which examples are processed, on every run and machine.
"""

import dataclasses
import hashlib
import math
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from data.mnist import IMAGE_SIDE

FAMILIES = ("identity", "translate", "rotate", "scale", "shear", "affine")
UNITS = {"identity": "", "translate": "px", "rotate": "degrees", "scale": "percent",
         "shear": "hundredths", "affine": ""}
CENTRE = (IMAGE_SIDE - 1) / 2.0  # 13.5: the centre of the 28x28 grid of pixel centres
MARGIN = 8                       # px of canvas around the frame, where no ink may land
MAX_MIX_DRAWS = 100              # random mixes tried per example before it is rejected
# The affine mix's ranges.
MIX_ROTATION_DEGREES = 20.0
MIX_SHEAR = 0.2
MIX_SCALE = (0.8, 1.2)
MIX_TRANSLATION = 3.0


def format_magnitude(family: str, magnitude: int) -> str:
    """A magnitude as people read it: '5 px', '±45°', '×1.20', '±0.40'; '–' for the identity,
    'random' for the affine mix."""
    return {"identity": "–", "affine": "random", "translate": f"{magnitude} px",
            "rotate": f"±{magnitude}°", "scale": f"×{magnitude / 100:.2f}",
            "shear": f"±{magnitude / 100:.2f}"}[family]


class AffineConfigError(ValueError):
    """The robustness split's configuration is malformed."""


@dataclasses.dataclass(frozen=True)
class AffineSpec:
    """Which transforms the robustness split holds: every test image under each of them.

    translate, rotate, scale, shear: the magnitudes of each family (module docstring: units).
    The identity (magnitude 0) and, with `mix`, the affine mix (magnitude 0) come on top.
    seed: the split's seed, mixed into every example's own.
    images: how many test images (the first ones) to transform; None: all of the test split.
    """
    translate: Tuple[int, ...] = (3, 4, 5)
    rotate: Tuple[int, ...] = (10, 20, 30, 45)
    scale: Tuple[int, ...] = (80, 90, 110, 120)
    shear: Tuple[int, ...] = (20, 40)
    mix: bool = True
    seed: int = 0
    images: Optional[int] = None

    def __post_init__(self):
        ranges = {"translate": (1, 13), "rotate": (1, 180), "scale": (10, 300),
                  "shear": (1, 200)}
        for family, (low, high) in ranges.items():
            values = getattr(self, family)
            if not isinstance(values, tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise AffineConfigError(f"{family} magnitudes must be a tuple of ints "
                                        f"({UNITS[family]}), got {values!r}")
            bad = [v for v in values if not low <= v <= high]
            if bad:
                raise AffineConfigError(f"{family} magnitudes must be in [{low}, {high}] "
                                        f"{UNITS[family]}, got {bad}")
            if len(set(values)) != len(values):
                raise AffineConfigError(f"{family} magnitudes must not repeat, got {values!r}")
        if 100 in self.scale:
            raise AffineConfigError("scale magnitude 100 is the identity; leave it out")
        if not isinstance(self.mix, bool):
            raise AffineConfigError(f"mix must be True or False, got {self.mix!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise AffineConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.images is not None and (not isinstance(self.images, int) or self.images < 1):
            raise AffineConfigError(f"images must be None (all) or an integer >= 1, "
                                    f"got {self.images!r}")

    def transforms(self) -> List[Tuple[str, int]]:
        """Every (family, magnitude) of the split, in FAMILIES order."""
        pairs = [("identity", 0)]
        for family in ("translate", "rotate", "scale", "shear"):
            pairs += [(family, m) for m in getattr(self, family)]
        return pairs + ([("affine", 0)] if self.mix else [])

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, values: dict) -> "AffineSpec":
        """The spec from `to_json_dict`'s dict (lists become tuples); unknown keys refused."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise AffineConfigError(f"unknown robustness split settings {unknown}; expected "
                                    f"some of {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ------------------------------------------------------------------------------- the geometry
def rotation(degrees: float) -> np.ndarray:
    """2x2 matrix acting on (x, y) column vectors, y downwards: positive is counter-clockwise on
    screen."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, s], [-s, c]])


def shear(k: float) -> np.ndarray:
    """Horizontal shear: x += k * y (about the centre)."""
    return np.array([[1.0, k], [0.0, 1.0]])


def scaling(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0], [0.0, sy]])


def warp(image: np.ndarray, matrix: np.ndarray, offset=(0.0, 0.0), margin: int = 0
         ) -> np.ndarray:
    """The image under p' = matrix @ (p - c) + c + offset, p = (x, y) pixel centres, c the
    centre, drawn on the 28x28 grid grown by `margin` px on every side.

    Each output pixel takes the bilinear interpolation of the input at its inverse image, zero
    outside the input; values are rounded half up and clipped to uint8. float64 throughout.
    image: uint8 [28, 28] -> uint8 [28 + 2 margin, 28 + 2 margin].
    """
    side = image.shape[0] + 2 * margin
    grid = np.arange(side, dtype=np.float64) - margin
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    inverse = np.linalg.inv(matrix)
    dx, dy = xs - CENTRE - offset[0], ys - CENTRE - offset[1]
    sx = inverse[0, 0] * dx + inverse[0, 1] * dy + CENTRE
    sy = inverse[1, 0] * dx + inverse[1, 1] * dy + CENTRE
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    padded = np.zeros((image.shape[0] + 2, image.shape[1] + 2), np.float64)
    padded[1:-1, 1:-1] = image

    def at(y, x):  # input pixel (y, x), zero outside
        inside = (y >= -1) & (y <= image.shape[0]) & (x >= -1) & (x <= image.shape[1])
        return np.where(inside, padded[np.clip(y + 1, 0, image.shape[0] + 1),
                                       np.clip(x + 1, 0, image.shape[1] + 1)], 0.0)

    value = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
             + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    return np.clip(np.floor(value + 0.5), 0, 255).astype(np.uint8)


def fits(canvas: np.ndarray, margin: int = MARGIN) -> bool:
    """Whether all ink of a canvas drawn by `warp(..., margin)` lies inside the 28x28 frame."""
    inner = canvas[margin:-margin, margin:-margin]
    return int(inner.sum(dtype=np.int64)) == int(canvas.sum(dtype=np.int64))


# ----------------------------------------------------------------------- one example, one family
def example_seed(seed: int, image: np.ndarray, label: int, family: str, magnitude: int
                 ) -> np.random.Generator:
    """The generator of one example's candidates: from the split's seed, the example's pixels
    and label, the family and the magnitude alone."""
    digest = hashlib.sha256(image.tobytes() + bytes([int(label)])).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([seed, *words, FAMILIES.index(family), magnitude + 1000])


def candidates(family: str, magnitude: int, rng: np.random.Generator
               ) -> Iterator[Tuple[np.ndarray, Tuple[float, float]]]:
    """(matrix, offset) of the transforms to try, in order (module docstring)."""
    if family == "identity":
        yield np.eye(2), (0.0, 0.0)
    elif family == "translate":
        m = magnitude
        ring = [(dx, dy) for dy in range(-m, m + 1) for dx in range(-m, m + 1)
                if max(abs(dx), abs(dy)) == m]
        for i in rng.permutation(len(ring)):
            yield np.eye(2), (float(ring[i][0]), float(ring[i][1]))
    elif family in ("rotate", "shear"):
        make = rotation if family == "rotate" else (lambda k: shear(k / 100.0))
        for sign in rng.permutation([1, -1]):
            yield make(int(sign) * magnitude), (0.0, 0.0)
    elif family == "scale":
        yield scaling(magnitude / 100.0, magnitude / 100.0), (0.0, 0.0)
    elif family == "affine":
        for _ in range(MAX_MIX_DRAWS):
            angle, k = rng.uniform(-MIX_ROTATION_DEGREES, MIX_ROTATION_DEGREES), rng.uniform(
                -MIX_SHEAR, MIX_SHEAR)
            sx, sy = rng.uniform(*MIX_SCALE, size=2)
            tx, ty = rng.uniform(-MIX_TRANSLATION, MIX_TRANSLATION, size=2)
            yield rotation(angle) @ shear(k) @ scaling(sx, sy), (float(tx), float(ty))
    else:
        raise AffineConfigError(f"unknown transform family {family!r}; expected one of "
                                f"{FAMILIES}")


@dataclasses.dataclass(frozen=True)
class Transformed:
    """One example's outcome: its image (None: rejected) and how many candidates were tried."""
    image: Optional[np.ndarray]
    tries: int

    @property
    def resampled(self) -> bool:
        return self.image is not None and self.tries > 1


def transform_example(image: np.ndarray, label: int, family: str, magnitude: int, seed: int
                      ) -> Transformed:
    """The first candidate transform of (family, magnitude) that keeps the digit's ink inside
    the frame: uint8 [28, 28] -> Transformed (image uint8 [28, 28], or None if none did)."""
    rng = example_seed(seed, image, label, family, magnitude)
    tries = 0
    for matrix, offset in candidates(family, magnitude, rng):
        tries += 1
        canvas = warp(image, matrix, offset, MARGIN)
        if fits(canvas):
            return Transformed(canvas[MARGIN:-MARGIN, MARGIN:-MARGIN].copy(), tries)
    return Transformed(None, tries)


def transform_all(image: np.ndarray, label: int, spec: AffineSpec
                  ) -> Iterator[Tuple[str, int, Transformed]]:
    """(family, magnitude, outcome) of one test image under every transform of the spec."""
    for family, magnitude in spec.transforms():
        yield family, magnitude, transform_example(image, label, family, magnitude, spec.seed)


def counts_by_transform(outcomes) -> Dict[Tuple[str, int], Dict[str, int]]:
    """{(family, magnitude): {'kept', 'resampled', 'rejected'}} of (family, magnitude,
    Transformed) triples."""
    counts: Dict[Tuple[str, int], Dict[str, int]] = {}
    for family, magnitude, outcome in outcomes:
        c = counts.setdefault((family, magnitude), {"kept": 0, "resampled": 0, "rejected": 0})
        c["kept" if outcome.image is not None else "rejected"] += 1
        c["resampled"] += outcome.resampled
    return counts
