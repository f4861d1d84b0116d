"""The train / valid / test splits of MNIST, as row ranges of the official arrays.

  train  official training images [0, 60000 - valid_size)
  valid  official training images [60000 - valid_size, 60000): a fixed hold-out, never trained on
  test   the official 10,000 test images

`data_fraction` keeps the first round(fraction * n) rows of each split (at least one), so small
runs are deterministic and every split keeps the official order.
"""

from typing import Dict, NamedTuple

SPLITS = ("train", "valid", "test")
OFFICIAL_SIZES = {"train": 60000, "test": 10000}
DEFAULT_VALID_SIZE = 5000  # the valid split: the last 5,000 official training images (55k / 5k)


class SplitRange(NamedTuple):
    """Rows [start, stop) of the official array pair `source` ('train' or 'test')."""
    source: str
    start: int
    stop: int


def split_ranges(valid_size: int, data_fraction: float) -> Dict[str, SplitRange]:
    """{'train'|'valid'|'test': SplitRange}. Raises ValueError on out-of-range arguments."""
    n_train = OFFICIAL_SIZES["train"]
    if not 0 < valid_size < n_train:
        raise ValueError(f"valid_size must be in (0, {n_train}), got {valid_size!r}")
    if not 0.0 < data_fraction <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction!r}")
    full = {
        "train": SplitRange("train", 0, n_train - valid_size),
        "valid": SplitRange("train", n_train - valid_size, n_train),
        "test": SplitRange("test", 0, OFFICIAL_SIZES["test"]),
    }
    return {name: r._replace(stop=r.start + max(1, round(data_fraction * (r.stop - r.start))))
            for name, r in full.items()}


def split_sizes(valid_size: int, data_fraction: float) -> Dict[str, int]:
    """Number of examples in each split."""
    return {name: r.stop - r.start for name, r in split_ranges(valid_size, data_fraction).items()}
