"""models/capsnet/augment.py: the shift both trainers use, exactly, for given offsets."""

import numpy as np
from keras import ops

from models.capsnet import augment


def test_shift_moves_each_image_by_its_own_offsets_with_zero_fill():
    images = np.arange(2 * 5 * 6, dtype="float32").reshape(2, 5, 6, 1) + 1.0
    # Offset o moves the content by max_shift - o: image 0 down 1 row and left 1 column, image 1
    # up 1 row.
    offsets = np.array([[0, 2], [2, 1]])
    out = ops.convert_to_numpy(augment.shift(images, offsets, 1))
    expected = np.zeros_like(images)
    expected[0, 1:, :5] = images[0, :4, 1:]
    expected[1, :4, :] = images[1, 1:, :]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(ops.convert_to_numpy(augment.shift(images, offsets * 0, 0)),
                                  images)
