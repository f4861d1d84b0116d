"""The training recipe, defined once: the pipeline's Trainer, the standalone trainer and the
benchmark all read this dataclass. The pipeline's RunConfig nests it; it travels to the Trainer
through `custom_config` as `to_custom_config()` (a plain dict) and comes back validated by
`from_custom_config`. Importing it loads no Keras or backend.

The defaults are the seed project's recipe (XifengGuo/CapsNet-Keras): 50 epochs of batch 100,
Adam 1e-3 multiplied by 0.9 after every epoch, random integer shifts of up to ±2 px with zero
fill (training images only), 3 routing iterations.
"""

import dataclasses
from typing import Any, Dict

from models.capsnet import hardware

SERVING_PRECISION_CHOICES = ("float32", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the CapsNet is trained.

    epochs             training epochs
    batch_size         global batch (split across MirroredStrategy replicas)
    learning_rate      Adam's initial learning rate
    lr_decay           the learning rate of epoch e (0-based) is learning_rate * lr_decay ** e
    max_shift          random integer shift of the training images, ±px, zero fill
    routings           dynamic-routing iterations
    mixed_precision    compute dtype (hardware.MIXED_PRECISION_CHOICES): "auto" = bfloat16 on a
                       CPU with native bf16 or a GPU of compute capability >= 8.0 (float32
                       variables and optimizer state; squash, routing, lengths and losses in
                       float32), float32 elsewhere; "none" = float32; or a forced Keras policy
    serving_precision  the exported serving graph's compute: "float32" (built from the float32
                       master weights, fast on any CPU, whatever training used) or
                       "mixed_bfloat16" (for serving hosts with native bf16)
    """
    epochs: int = 50
    batch_size: int = 100
    learning_rate: float = 1e-3
    lr_decay: float = 0.9
    max_shift: int = 2
    routings: int = 3
    mixed_precision: str = hardware.AUTO
    serving_precision: str = "float32"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "routings"):
            check(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        check(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        check(0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]", self.lr_decay)
        check(0 <= self.max_shift < 14, "max_shift", "in [0, 14)", self.max_shift)
        check(self.mixed_precision in hardware.MIXED_PRECISION_CHOICES, "mixed_precision",
              f"one of {hardware.MIXED_PRECISION_CHOICES}", self.mixed_precision)
        check(self.serving_precision in SERVING_PRECISION_CHOICES, "serving_precision",
              f"one of {SERVING_PRECISION_CHOICES}", self.serving_precision)

    def learning_rate_at(self, epoch: int) -> float:
        """The learning rate of 0-based epoch `epoch`."""
        return self.learning_rate * self.lr_decay ** epoch

    def serving_policy(self):
        """The Keras dtype policy of the exported serving graph (None: float32)."""
        return None if self.serving_precision == "float32" else self.serving_precision

    def to_custom_config(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_custom_config(cls, custom_config: Dict[str, Any]) -> "Recipe":
        """The recipe in a Trainer's custom_config, validated. Keys that are not recipe fields
        (the pipeline adds a code fingerprint) are ignored. The precision fields came later:
        missing, they mean what configs without them trained with (float32); any other missing
        field is a KeyError naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in custom_config.items() if key in fields}
        values.setdefault("mixed_precision", hardware.NONE)
        values.setdefault("serving_precision", "float32")
        missing = sorted(fields - set(values))
        if missing:
            raise KeyError(f"custom_config lacks the recipe fields {missing}")
        return cls(**values)


def check(ok: bool, name: str, expected: str, got) -> None:
    """Raises ValueError('<name> must be <expected>, got <got>') unless ok."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")
