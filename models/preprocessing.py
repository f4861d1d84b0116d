"""Transform's `preprocessing_fn`: the pixel normalisation that training and serving share.

Transform traces this function into the transform graph; the Trainer exports that graph inside
the SavedModel, so a serving request is normalised by exactly this code.
"""

import tensorflow as tf

from models import features


def normalize_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """Raw MNIST pixel bytes -> float32 images in [0, 1].

    Args:
      image_bytes: string tensor [B] or [B, 1]; each element holds 784 uint8 pixels, row-major.

    Returns:
      float32 [B, 28, 28, 1], pixel / 255. Any element that is not exactly 784 bytes fails with an
      InvalidArgumentError saying so (an empty batch is fine).
    """
    flat = tf.reshape(image_bytes, [-1])
    sizes_ok = tf.reduce_all(tf.equal(tf.strings.length(flat), features.NUM_PIXELS))
    check = tf.debugging.Assert(sizes_ok, [
        f"each '{features.IMAGE_KEY}' value must hold {features.NUM_PIXELS} bytes "
        f"({features.IMAGE_SIZE}x{features.IMAGE_SIZE} uint8 pixels); byte counts:",
        tf.strings.length(flat)])
    with tf.control_dependencies([check]):
        pixels = tf.io.decode_raw(flat, tf.uint8, fixed_length=features.NUM_PIXELS)  # [B, 784]
    images = tf.reshape(pixels, [-1, features.IMAGE_SIZE, features.IMAGE_SIZE, 1])
    return tf.cast(images, tf.float32) / 255.0


def preprocessing_fn(inputs):
    """tf.Transform entry point.

    Args:
      inputs: {'image': string [B, 1], 'label': int64 [B, 1]} as parsed with the raw schema.

    Returns:
      {'image_xf': float32 [B, 28, 28, 1] in [0, 1], 'label_xf': int64 [B]} (label passed through).
    """
    return {
        features.transformed_name(features.IMAGE_KEY): normalize_pixels(inputs[features.IMAGE_KEY]),
        features.transformed_name(features.LABEL_KEY): tf.reshape(inputs[features.LABEL_KEY], [-1]),
    }
