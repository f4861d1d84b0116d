"""CapsNet for MNIST as two functional Keras models sharing every weight.

  train_model     {"image": [B,28,28,1], "label": one-hot [B,10]}
                  -> {"lengths": [B,10], "recon": [B,784]}   decoder masked by the TRUE label
  inference_model image [B,28,28,1] (one tensor; its Input is named "image")
                  -> {"lengths": [B,10], "recon": [B,784]}   decoder masked by the longest capsule

Trainable parameters: 8,215,568 (6,804,224 without the decoder), spec section 3.
"""

import math
import os

import keras

from data.mnist import IMAGE_SIDE
from models.capsnet.layers import Conv2D, DigitCaps, Length, Mask, PrimaryCaps
from models.capsnet.losses import RECON_WEIGHT, margin_loss, reconstruction_loss

# The models' input and output keys.
IMAGE = "image"
LABEL = "label"
LENGTHS = "lengths"
RECON = "recon"
# Layer names (tools find the capsules and the decoder by them).
CONV1 = "conv1"
PRIMARY_CAPS = "primary_caps"
DIGIT_CAPS = "digit_caps"
DECODER = "decoder"
# Where a serving export keeps the whole Keras inference model, decoder included (relative to
# the SavedModel dir; models/serving.py writes it, visualize.py reads it).
KERAS_MODEL_FILE = os.path.join("keras", "capsnet.keras")


def build_capsnet(input_shape=(IMAGE_SIDE, IMAGE_SIDE, 1), n_class=10, routings=3, stop_gradient_routing=False,
                  dtype_policy=None):
    """Builds (train_model, inference_model); see the module docstring for inputs and outputs.

    dtype_policy: None (float32) or a Keras mixed policy, "mixed_float16" / "mixed_bfloat16", for
    GPUs: variables stay float32, the convolutions and the decoder compute in 16 bits, while
    DigitCaps (u_hat and routing), squash, the capsule lengths and the losses compute in float32
    (they cast), and the `lengths` output is float32. `compile_capsnet` adds loss scaling for
    mixed_float16.
    """
    dtype = keras.DTypePolicy(dtype_policy) if dtype_policy else None
    image = keras.Input(shape=input_shape, name=IMAGE)
    label = keras.Input(shape=(n_class,), name=LABEL)

    x = Conv2D(256, 9, strides=1, padding="valid", activation="relu", name=CONV1,
               dtype=dtype)(image)
    u = PrimaryCaps(n_channels=32, dim=8, kernel_size=9, strides=2, name=PRIMARY_CAPS,
                    dtype=dtype)(x)
    v = DigitCaps(n_caps=n_class, dim=16, routings=routings,
                  stop_gradient_routing=stop_gradient_routing, name=DIGIT_CAPS, dtype=dtype)(u)
    lengths = Length(name=LENGTHS)(v)  # float32 policy: the lengths feed the margin loss

    # One decoder object, called on both masks, so both models share its weights.
    decoder = keras.Sequential(
        [
            keras.Input(shape=(n_class * 16,)),
            keras.layers.Dense(512, activation="relu", name="fc1", dtype=dtype),
            keras.layers.Dense(1024, activation="relu", name="fc2", dtype=dtype),
            keras.layers.Dense(math.prod(input_shape), activation="sigmoid", name="fc3",
                               dtype=dtype),
        ],
        name=DECODER)
    # Identity layers only give the outputs their key as layer name (model.output_names).
    recon_true = keras.layers.Identity(name=RECON)(decoder(Mask(name="mask_by_label")([v, label])))
    recon_longest = keras.layers.Identity(name=RECON)(decoder(Mask(name="mask_by_length")(v)))

    train_model = keras.Model({IMAGE: image, LABEL: label},
                              {LENGTHS: lengths, RECON: recon_true}, name="capsnet_train")
    # A single tensor input (the Input is still named "image"): serving calls model(images).
    inference_model = keras.Model(image, {LENGTHS: lengths, RECON: recon_longest},
                                  name="capsnet")
    return train_model, inference_model


def compile_capsnet(train_model, learning_rate=1e-3, optimizer=None, recon_weight=RECON_WEIGHT):
    """Adam; margin loss on lengths + recon_weight * per-pixel MSE on recon; accuracy on lengths.

    optimizer: an Adam-equivalent optimizer to use instead of keras.optimizers.Adam(learning_rate)
    (the Trainer passes a fused implementation of the same update on TensorFlow; both trainers
    build theirs with models/capsnet/schedule.py's learning-rate schedule and EMA). A model built
    with the mixed_float16 policy gets dynamic loss scaling (LossScaleOptimizer), as float16
    gradients underflow without it; bfloat16 needs none.

    Keras names the logged metrics `loss`, `lengths_loss`, `recon_loss`, `lengths_accuracy`
    (and `val_` + each on validation data).
    """
    optimizer = optimizer or keras.optimizers.Adam(learning_rate=learning_rate)
    if (train_model.get_layer(CONV1).dtype_policy.name == "mixed_float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    train_model.compile(
        optimizer=optimizer,
        loss={LENGTHS: margin_loss, RECON: reconstruction_loss},
        loss_weights={LENGTHS: 1.0, RECON: recon_weight},
        metrics={LENGTHS: [keras.metrics.CategoricalAccuracy(name="accuracy")]},
    )
