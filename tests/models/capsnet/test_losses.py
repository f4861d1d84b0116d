"""models/capsnet/losses.py against hand-computed numbers."""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet.losses import RECON_WEIGHT, margin_loss, reconstruction_loss


def test_margin_loss_hand_computed():
    y_true = np.array([[0, 1, 0], [1, 0, 0]], dtype="float32")
    lengths = np.array([[0.2, 0.95, 0.05], [0.5, 0.3, 0.1]], dtype="float32")
    # sample 0: absent 0.2 -> 0.5 * 0.1^2 = 0.005; present 0.95 >= 0.9 -> 0; absent 0.05 <= 0.1 -> 0
    # sample 1: present 0.5 -> 0.4^2 = 0.16; absent 0.3 -> 0.5 * 0.2^2 = 0.02; absent 0.1 -> 0
    out = ops.convert_to_numpy(margin_loss(y_true, lengths))
    assert out.shape == (2,)
    np.testing.assert_allclose(out, [0.005, 0.18], rtol=1e-5)


def test_margin_loss_custom_margins():
    y_true = np.array([[1, 0]], dtype="float32")
    lengths = np.array([[0.5, 0.5]], dtype="float32")
    # present (0.8 - 0.5)^2 = 0.09; absent 2 * (0.5 - 0.2)^2 = 0.18
    out = ops.convert_to_numpy(margin_loss(y_true, lengths, m_plus=0.8, m_minus=0.2, lam=2.0))
    np.testing.assert_allclose(out, [0.27], rtol=1e-5)


def test_margin_loss_is_zero_inside_the_margins_and_at_init_is_0_81():
    y_true = np.eye(10, dtype="float32")[[3, 7]]
    perfect = np.where(y_true == 1, 0.95, 0.05).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(margin_loss(y_true, perfect)), 0.0)
    # All lengths ~0 (a fresh CapsNet): only the true class contributes, 0.9^2.
    np.testing.assert_allclose(ops.convert_to_numpy(margin_loss(y_true, np.zeros_like(y_true))),
                               [0.81, 0.81], rtol=1e-6)


def test_reconstruction_loss_is_per_pixel_mse_per_sample():
    y_true = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype="float32")
    y_pred = np.array([[0.5, 0.5, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]], dtype="float32")
    out = ops.convert_to_numpy(reconstruction_loss(y_true, y_pred))
    assert out.shape == (2,)
    np.testing.assert_allclose(out, [0.125, 0.25], rtol=1e-6)


def test_reconstruction_loss_accepts_image_shaped_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(2, 3, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(reconstruction_loss(a, b)),
                               ops.convert_to_numpy(reconstruction_loss(a.reshape(3, -1),
                                                                        b.reshape(3, -1))),
                               rtol=1e-6)


def test_recon_weight_equals_paper_sse_scaling():
    # 0.0005 * sum of squared errors over 784 pixels == RECON_WEIGHT * per-pixel MSE.
    assert RECON_WEIGHT == pytest.approx(0.0005 * 784)
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(2, 4, 784)).astype("float32")
    sse = ((a - b) ** 2).sum(axis=-1)
    np.testing.assert_allclose(RECON_WEIGHT * ops.convert_to_numpy(reconstruction_loss(a, b)),
                               0.0005 * sse, rtol=1e-5)


def test_losses_are_registered_for_saving():
    for fn in (margin_loss, reconstruction_loss):
        name = keras.saving.get_registered_name(fn)
        assert name == f"capsnet>{fn.__name__}"
        assert keras.saving.get_registered_object(name) is fn
