"""The training recipe, defined once: the pipeline's Trainers, the standalone trainer and the
benchmark all read this dataclass and build their recipe flags from its fields (`add_flags`).
The pipeline's RunConfig nests it; it travels to a Trainer through `custom_config` as
`to_custom_config()` (a plain dict) and comes back validated by `from_custom_config`. Importing
it loads no Keras or backend.

The field defaults are the CapsNet's, the seed project's recipe (XifengGuo/CapsNet-Keras): 50
epochs of batch 100, Adam 1e-3 multiplied by 0.9 after every epoch, random integer shifts of up
to ±2 px with zero fill (training images only), 3 routing iterations, margin loss + 0.392 x
reconstruction loss. `default_recipe` gives each network's own.
"""

import dataclasses
import math
from typing import Any, Dict

from models.capsnet import hardware

SERVING_PRECISION_CHOICES = ("float32", "mixed_bfloat16")
LR_SCHEDULE_CHOICES = ("exponential", "cosine")
NETWORK_CHOICES = ("capsnet", "cnn")  # models/networks.py defines them
# The reconstruction loss's weight, as in the paper (0.0005 x sum of squared errors over 784
# pixels == 0.392 x per-pixel MSE) and the seed; models/capsnet/losses.py explains the scaling.
RECON_WEIGHT = 0.392
# Fields added after the first configs: missing from a custom_config, they take the value those
# configs trained with.
LATER_FIELDS = {"mixed_precision": hardware.NONE, "serving_precision": "float32", "seed": 0,
                "lr_schedule": "exponential", "warmup_epochs": 0.0, "ema_momentum": 0.0,
                "recon_weight": RECON_WEIGHT, "network": "capsnet"}


def _field(default, help: str, choices=None):
    """A recipe field: its default, and the help and choices its command-line flag shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a network is trained: the defaults are the CapsNet's (the seed project's recipe).
    Each field's help is its command-line flag's (`add_flags`)."""
    epochs: int = _field(50, "training epochs")
    batch_size: int = _field(100, "global batch (split across the replicas)")
    learning_rate: float = _field(1e-3, "Adam's initial (exponential) or peak (cosine) "
                                        "learning rate")
    lr_decay: float = _field(0.9, "the exponential schedule's factor per epoch")
    max_shift: int = _field(2, "random integer shift of the training images, ±px, zero fill")
    routings: int = _field(3, "dynamic-routing iterations (CapsNet)")
    mixed_precision: str = _field(
        hardware.AUTO, "compute dtype: 'auto' = bfloat16 (float32 variables and optimizer "
        "state; the CapsNet's routing, squash, lengths and losses in float32) on CPUs with "
        "native bf16 (AMX-BF16, AVX512_BF16) and GPUs of compute capability >= 8.0, float32 "
        "elsewhere; 'none' = float32; or a forced Keras mixed policy",
        hardware.MIXED_PRECISION_CHOICES)
    serving_precision: str = _field(
        "float32", "the exported serving graph's compute: float32 (built from the float32 "
        "master weights, fast on any CPU) or mixed_bfloat16 (for serving hosts with native "
        "bf16)", SERVING_PRECISION_CHOICES)
    seed: int = _field(0, "seeds the weights, the shuffle order and the shifts; epoch e's order "
                          "and shifts come from (seed, e) alone, so a resumed run draws what an "
                          "uninterrupted one draws")
    lr_schedule: str = _field(
        "exponential", "exponential: learning_rate x lr_decay^e in 0-based epoch e, constant "
        "within the epoch; cosine: per step, linear warm-up from 0 over warmup_epochs, then "
        "cosine decay to 0 at the end of the last epoch", LR_SCHEDULE_CHOICES)
    warmup_epochs: float = _field(0.0, "the cosine schedule's warm-up, in epochs (fractions "
                                       "allowed; < epochs)")
    ema_momentum: float = _field(0.0, "0: off; else Adam keeps an exponential moving average "
                                      "of the weights, and the evaluated and exported model "
                                      "carries it")
    recon_weight: float = _field(RECON_WEIGHT, "weight of the CapsNet's reconstruction loss "
                                               "(per-pixel MSE) against the margin loss")
    network: str = _field("capsnet", "the network trained: capsnet, or cnn (the paper's "
                                     "baseline, models/cnn)", NETWORK_CHOICES)

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
        check(self.network in NETWORK_CHOICES, "network", f"one of {NETWORK_CHOICES}",
              self.network)

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


def flag_name(field_name: str) -> str:
    """A recipe field's command-line flag: 'batch_size' -> '--batch-size'."""
    return "--" + field_name.replace("_", "-")


def add_flags(parser, defaults: Recipe, exclude=(), title: str = "the training recipe"):
    """Adds one flag per Recipe field (but `exclude`) to an argparse parser, in a group of its
    own: the field's type, choices and help, and `defaults`' value as the stated default. Every
    flag defaults to None, "not given": `flag_values` returns only those given."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(Recipe):
        if field.name in exclude:
            continue
        group.add_argument(flag_name(field.name), type=field.type, dest=field.name,
                           choices=field.metadata["choices"], default=None,
                           help=f"{field.metadata['help']} (default: "
                                f"{getattr(defaults, field.name)})")
    return group


def flag_values(args) -> Dict[str, Any]:
    """{field: value} of the recipe flags given on the command line (`add_flags`'s)."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(Recipe)
            if getattr(args, field.name, None) is not None}


# Each network's own recipe. The CapsNet's is the seed project's (the field defaults, which the
# recipe search on the valid split kept). The CNN's, chosen on the valid split: the CapsNet's
# Adam, decay, batch and shifts, but a learning rate of 1e-4 (1e-3 left its 33M-weight first
# dense layer under-fitted), for 8 epochs (docs/robustness.md).
DEFAULT_RECIPES = {"capsnet": Recipe(),
                   "cnn": Recipe(network="cnn", epochs=8, learning_rate=1e-4)}


def default_recipe(network: str) -> Recipe:
    """The recipe `network` trains with unless told otherwise."""
    check(network in DEFAULT_RECIPES, "network", f"one of {NETWORK_CHOICES}", network)
    return DEFAULT_RECIPES[network]
