"""The training recipe, defined once: the pipeline's Trainer, the standalone trainer and the
benchmark all read this dataclass. The pipeline's RunConfig nests it; it travels to the Trainer
through `custom_config` as `to_custom_config()` (a plain dict) and comes back validated by
`from_custom_config`. Importing it loads no Keras or backend.

The defaults are the seed project's recipe (XifengGuo/CapsNet-Keras): 50 epochs of batch 100,
Adam 1e-3 multiplied by 0.9 after every epoch, random integer shifts of up to ±2 px with zero
fill (training images only), 3 routing iterations, margin loss + 0.392 x reconstruction loss.
"""

import dataclasses
import math
from typing import Any, Dict

from models.capsnet import hardware

SERVING_PRECISION_CHOICES = ("float32", "mixed_bfloat16")
LR_SCHEDULE_CHOICES = ("exponential", "cosine")
# The reconstruction loss's weight, as in the paper (0.0005 x sum of squared errors over 784
# pixels == 0.392 x per-pixel MSE) and the seed; models/capsnet/losses.py explains the scaling.
RECON_WEIGHT = 0.392
# Fields added after the first configs: missing from a custom_config, they take the value those
# configs trained with.
LATER_FIELDS = {"mixed_precision": hardware.NONE, "serving_precision": "float32", "seed": 0,
                "lr_schedule": "exponential", "warmup_epochs": 0.0, "ema_momentum": 0.0,
                "recon_weight": RECON_WEIGHT}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the CapsNet is trained.

    epochs             training epochs
    batch_size         global batch (split across MirroredStrategy replicas)
    learning_rate      Adam's initial (exponential) or peak (cosine) learning rate
    lr_schedule        "exponential": learning_rate * lr_decay ** e in 0-based epoch e, constant
                       within the epoch; "cosine": per step, linear warm-up from 0 over
                       warmup_epochs, then cosine decay to 0 at the end of the last epoch
    lr_decay           the exponential schedule's factor per epoch (the cosine ignores it)
    warmup_epochs      the cosine schedule's warm-up, in epochs (fractions allowed; < epochs)
    ema_momentum       0: off; else Adam keeps an exponential moving average of the weights
                       (Keras' use_ema) and the evaluated and exported model carries it
    recon_weight       weight of the reconstruction loss (per-pixel MSE) against the margin
                       loss; 0.392 = the paper's 0.0005 x sum of squared errors over 784 pixels
    seed               seeds the weights, the shuffle order and the shifts; epoch e's order and
                       shifts come from (seed, e) alone, so a resumed run draws what an
                       uninterrupted one draws
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
    seed: int = 0
    lr_schedule: str = "exponential"
    warmup_epochs: float = 0.0
    ema_momentum: float = 0.0
    recon_weight: float = RECON_WEIGHT

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
        check(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0",
              self.seed)
        check(self.lr_schedule in LR_SCHEDULE_CHOICES, "lr_schedule",
              f"one of {LR_SCHEDULE_CHOICES}", self.lr_schedule)
        if self.lr_schedule == "cosine":
            check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                  f"in [0, epochs = {self.epochs})", self.warmup_epochs)
        else:  # a warm-up the schedule would silently ignore
            check(self.warmup_epochs == 0, "warmup_epochs",
                  f"0 with lr_schedule {self.lr_schedule!r} (warm-up is the cosine's)",
                  self.warmup_epochs)
        check(0 <= self.ema_momentum < 1, "ema_momentum", "in [0, 1) (0: off)",
              self.ema_momentum)
        check(self.recon_weight >= 0, "recon_weight", ">= 0", self.recon_weight)

    def learning_rate_at(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """The learning rate of 0-based step `step` of 0-based epoch `epoch` (epochs of
        `steps_per_epoch` steps; the exponential schedule needs neither)."""
        if self.lr_schedule == "exponential":
            return self.learning_rate * self.lr_decay ** epoch
        done = epoch * steps_per_epoch + step  # steps before this one
        warmup = self.warmup_epochs * steps_per_epoch
        if done < warmup:
            return self.learning_rate * done / warmup
        progress = (done - warmup) / (self.epochs * steps_per_epoch - warmup)
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def serving_policy(self):
        """The Keras dtype policy of the exported serving graph (None: float32)."""
        return None if self.serving_precision == "float32" else self.serving_precision

    def to_custom_config(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_custom_config(cls, custom_config: Dict[str, Any]) -> "Recipe":
        """The recipe in a Trainer's custom_config, validated. Keys that are not recipe fields
        (the pipeline adds a code fingerprint) are ignored. The LATER_FIELDS came later:
        missing, they mean what configs without them trained with (float32, the exponential
        schedule, no EMA, ...); any other missing field is a KeyError naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {**LATER_FIELDS,
                  **{key: value for key, value in custom_config.items() if key in fields}}
        missing = sorted(fields - set(values))
        if missing:
            raise KeyError(f"custom_config lacks the recipe fields {missing}")
        return cls(**values)


def check(ok: bool, name: str, expected: str, got) -> None:
    """Raises ValueError('<name> must be <expected>, got <got>') unless ok."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")
