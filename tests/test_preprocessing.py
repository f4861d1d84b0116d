"""preprocessing_fn and the pixel packing of the image signature, on real bytes."""

import numpy as np
import pytest
import tensorflow as tf

from models import features, preprocessing, serving


def test_normalize_pixels_maps_bytes_to_unit_interval():
    pixels = np.arange(784, dtype=np.int64) % 256
    raw = tf.constant([[pixels.astype(np.uint8).tobytes()]])  # [1, 1] as parsed with the schema
    images = preprocessing.normalize_pixels(raw).numpy()
    assert images.shape == (1, 28, 28, 1) and images.dtype == np.float32
    np.testing.assert_allclose(images.reshape(-1), pixels / 255.0, rtol=1e-6)
    assert images.min() == 0.0 and images.max() == 1.0


def test_preprocessing_fn_outputs_image_and_label():
    batch = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = preprocessing.preprocessing_fn({
        "image": tf.constant([[img.tobytes()] for img in batch]),
        "label": tf.constant([[7], [0], [9]], tf.int64)})
    assert set(out) == {"image_xf", "label_xf"}
    np.testing.assert_allclose(out["image_xf"].numpy()[..., 0], batch / 255.0, rtol=1e-6)
    assert out["label_xf"].numpy().tolist() == [7, 0, 9]


@pytest.mark.parametrize("values", [[b"\x00" * 100], [b"\x00" * 784, b"\x00" * 785], [b""]])
def test_normalize_pixels_rejects_wrong_byte_count(values):
    with pytest.raises(tf.errors.InvalidArgumentError, match="must hold 784 bytes"):
        preprocessing.normalize_pixels(tf.constant([[v] for v in values]))


def test_normalize_pixels_accepts_an_empty_batch():
    images = preprocessing.normalize_pixels(tf.zeros([0, 1], tf.string))
    assert images.shape == (0, 28, 28, 1)


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 28, 28, 1)])
def test_images_to_raw_bytes_round_trips(shape):
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    raw = serving.images_to_raw_bytes(tf.constant(images)).numpy()
    assert raw.shape == (2, 1)
    assert [r[0] for r in raw] == [img.tobytes() for img in images]
    np.testing.assert_array_equal(
        preprocessing.normalize_pixels(tf.constant(raw)).numpy().reshape(shape),
        images.astype(np.float32) / 255.0)


@pytest.mark.parametrize("shape", [(2, 784), (2, 27, 28), (2, 28, 28, 3), (28, 28),
                                   (1, 2, 28, 28, 1), (2,)])
def test_images_to_raw_bytes_rejects_wrong_shapes(shape):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[N,28,28\] or \[N,28,28,1\]"):
        serving.images_to_raw_bytes(tf.zeros(shape, tf.uint8))


def test_images_to_raw_bytes_accepts_an_empty_batch():
    assert serving.images_to_raw_bytes(tf.zeros([0, 28, 28], tf.uint8)).shape == (0, 1)


def test_feature_names():
    assert features.transformed_name(features.IMAGE_KEY) == "image_xf"
    assert features.NUM_PIXELS == 784

