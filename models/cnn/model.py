"""The paper's baseline CNN (section 5.1) for MNIST:

    image [B,28,28,1]
      -> conv1  5x5, 256 channels, stride 1, SAME, ReLU   [B,28,28,256]
      -> conv2  5x5, 256 channels, stride 1, SAME, ReLU   [B,28,28,256]
      -> conv3  5x5, 128 channels, stride 1, SAME, ReLU   [B,28,28,128]
      -> flatten                                           [B,100352]
      -> fc1 328, ReLU -> fc2 192, ReLU -> dropout 0.5
      -> fc3 10, softmax                                   {"probabilities": [B,10]}

The paper gives the layers and 35.4M parameters, not the padding, the activations or the
dropout rate. Only SAME padding without pooling gives that count (35,445,522; VALID padding gives
about 13M), so the convolutions keep the 28x28 grid; ReLU and a rate of 0.5 are the usual
choices. Trained with cross-entropy on the softmax.

One model serves for training and inference (dropout is active only in training), so
`build_cnn` returns it twice, in the shape of `build_capsnet`'s (train_model, inference_model).
"""

import os

import keras

from data.mnist import IMAGE_SIDE

IMAGE = "image"                  # the input's name, as the CapsNet's
PROBABILITIES = "probabilities"  # the output's key: the softmax over the 10 classes
CONV1 = "conv1"                  # the first layer's name: its dtype policy is the model's
DROPOUT_RATE = 0.5
# Where a serving export keeps the Keras model (relative to the SavedModel dir; models/serving.py).
KERAS_MODEL_FILE = os.path.join("keras", "cnn.keras")
PARAMETERS = 35_445_522          # the paper's 35.4M, exactly, for this layout


def build_cnn(input_shape=(IMAGE_SIDE, IMAGE_SIDE, 1), n_class=10, dtype_policy=None):
    """Builds the CNN; returns (model, model): see the module docstring for its shapes.

    dtype_policy: None (float32) or a Keras mixed policy ("mixed_bfloat16", "mixed_float16"):
    float32 variables, 16-bit convolutions and dense layers; the softmax computes in float32, so
    the probabilities and the loss are float32.
    """
    dtype = keras.DTypePolicy(dtype_policy) if dtype_policy else None
    image = keras.Input(shape=input_shape, name=IMAGE)
    x = image
    for name, channels in ((CONV1, 256), ("conv2", 256), ("conv3", 128)):
        x = keras.layers.Conv2D(channels, 5, strides=1, padding="same", activation="relu",
                                name=name, dtype=dtype)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(328, activation="relu", name="fc1", dtype=dtype)(x)
    x = keras.layers.Dense(192, activation="relu", name="fc2", dtype=dtype)(x)
    x = keras.layers.Dropout(DROPOUT_RATE, name="dropout")(x)
    logits = keras.layers.Dense(n_class, name="fc3", dtype=dtype)(x)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name=PROBABILITIES)(logits)
    model = keras.Model(image, {PROBABILITIES: probabilities}, name="cnn")
    return model, model


def compile_cnn(model, optimizer=None, learning_rate=1e-3):
    """Adam (or `optimizer`, an Adam-equivalent: the Trainer passes its fused one); cross-entropy
    on the probabilities against one-hot labels; accuracy. A mixed_float16 model gets dynamic
    loss scaling, as `compile_capsnet` gives it. Keras logs `loss` and
    `probabilities_accuracy` (and `val_` + each)."""
    optimizer = optimizer or keras.optimizers.Adam(learning_rate=learning_rate)
    if (model.get_layer(CONV1).dtype_policy.name == "mixed_float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer,
                  loss={PROBABILITIES: keras.losses.CategoricalCrossentropy()},
                  metrics={PROBABILITIES: [keras.metrics.CategoricalAccuracy(name="accuracy")]})
