"""CapsNet losses, per sample (Keras averages them over the batch).

Total loss = margin_loss + recon_weight * reconstruction_loss, as in the paper (0.0005 * SSE over
784 pixels == 0.392 * per-pixel MSE) and XifengGuo/CapsNet-Keras. The official code's extra 0.5 and
/10 on the margin loss (20x larger relative reconstruction weight) is NOT used. recon_weight is the
recipe's (models/capsnet/recipe.py), RECON_WEIGHT = 0.392 by default.
"""

import keras
from keras import ops

from models.capsnet.recipe import RECON_WEIGHT  # noqa: F401 (the default weight, exported here)


@keras.saving.register_keras_serializable(package="capsnet")
def margin_loss(y_true, y_pred, m_plus=0.9, m_minus=0.1, lam=0.5):
    """Paper eq. 4, summed over classes: for each sample
        sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2.

    y_true: one-hot [B, K]; y_pred: capsule lengths [B, K] -> [B]. Computed in float32.
    """
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "float32")
    present = ops.square(ops.relu(m_plus - y_pred))
    absent = ops.square(ops.relu(y_pred - m_minus))
    return ops.sum(y_true * present + lam * (1.0 - y_true) * absent, axis=-1)


@keras.saving.register_keras_serializable(package="capsnet")
def reconstruction_loss(y_true, y_pred):
    """Per-pixel mean squared error per sample: [B, 784] (or [B, H, W, C], same for both) -> [B].

    Multiply by the recipe's recon_weight (compile_capsnet does it via loss_weights).
    """
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "float32")
    axes = tuple(range(1, len(y_pred.shape)))
    return ops.mean(ops.square(y_true - y_pred), axis=axes)
