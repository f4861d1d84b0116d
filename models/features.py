"""Feature keys, image geometry and serving outputs shared by ExampleGen, Transform, Trainer,
serving and Evaluator.

Raw tf.Examples (written by `components.mnist_example_gen`):
  IMAGE_KEY  bytes, one value: the 28*28 uint8 pixels, row-major (784 bytes)
  LABEL_KEY  int64, one value: the digit 0..9
Transformed features (written by Transform, read by the Trainer) carry the `_xf` suffix.
"""

from data import mnist

IMAGE_KEY = "image"
LABEL_KEY = "label"

IMAGE_SIZE = mnist.IMAGE_SIDE
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10


# The serving signatures' outputs (models/serving.py); the Evaluator reads SCORES.
SCORES = "scores"    # float32 [N, 10] capsule lengths
CLASSES = "classes"  # int64 [N], their argmax


def transformed_name(key: str) -> str:
    """Name of a feature after Transform, e.g. 'image' -> 'image_xf'."""
    return f"{key}_xf"
