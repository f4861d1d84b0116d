"""The training images' augmentation: random integer shifts with zero fill, as the seed trains
(its shift_fraction 0.1; here up to ±max_shift px, 2 in the recipe). Training images only.

The shift itself is one keras.ops function of the offsets, so the Trainer's tf.data pipeline and
the standalone trainer's numpy batches share it; each draws the offsets its own way.
"""

from keras import ops


def shift(images, offsets, max_shift):
    """Image b's content moved down by max_shift - offsets[0, b] and right by
    max_shift - offsets[1, b] px (each in [-max_shift, max_shift]), zero fill.

    images [B, H, W, C]; offsets int [2, B] in [0, 2 * max_shift] -> [B, H, W, C].
    Pad by max_shift on every side, then gather an H x W window per image at its offset.
    """
    if max_shift == 0:
        return images
    height, width = images.shape[1], images.shape[2]
    s = max_shift
    padded = ops.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))  # [B, H + 2s, W + 2s, C]
    offsets = ops.cast(offsets, "int32")
    rows = offsets[0][:, None] + ops.arange(height, dtype="int32")[None, :]  # [B, H]
    cols = offsets[1][:, None] + ops.arange(width, dtype="int32")[None, :]  # [B, W]
    padded = ops.take_along_axis(padded, rows[:, :, None, None], axis=1)  # [B, H, W + 2s, C]
    return ops.take_along_axis(padded, cols[:, None, :, None], axis=2)  # [B, H, W, C]
