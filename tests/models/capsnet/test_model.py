"""models/capsnet/model.py: shapes, parameter counts, weight sharing, masking, compile, save/load,
and a few real training steps."""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet import RECON_WEIGHT, build_capsnet, compile_capsnet, margin_loss
from models.capsnet.layers import DigitCaps, Mask
from models.capsnet.losses import reconstruction_loss

TOTAL_PARAMS = 8_215_568
WITHOUT_DECODER = 6_804_224
DECODER_PARAMS = 1_411_344


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def batch(n, seed=0):
    """n binary 28x28 images (about 20 % ink) with labels 0..n-1, as model inputs and targets."""
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(n, 28, 28, 1)) < 0.2).astype("float32")
    y = np.eye(10, dtype="float32")[np.arange(n) % 10]
    return {"image": x, "label": y}, {"lengths": y, "recon": x.reshape(n, 784)}


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    return build_capsnet()


@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_of_both_models(models, n):
    train_model, inference_model = models
    inputs, _ = batch(n)
    out = train_model(inputs)
    assert set(out) == {"lengths", "recon"}
    assert tuple(out["lengths"].shape) == (n, 10)
    assert tuple(out["recon"].shape) == (n, 784)
    out = inference_model(inputs["image"])
    assert set(out) == {"lengths", "recon"}
    assert tuple(out["lengths"].shape) == (n, 10)
    assert tuple(out["recon"].shape) == (n, 784)
    recon = ops.convert_to_numpy(out["recon"])
    assert np.all((recon >= 0) & (recon <= 1))


@pytest.mark.edge_batch
@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("n", [0, 1])
def test_edge_batches_through_the_whole_model(n, policy):
    """0 and 1 images through the inference model, eagerly and in a graph whose batch is unknown
    (as in the serving signatures), and a training step on 1: right shapes, finite values."""
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    train_model, inference_model = build_capsnet(dtype_policy=policy)
    inputs, targets = batch(n)
    graph = tf.function(inference_model, input_signature=[tf.TensorSpec([None, 28, 28, 1])])
    for out in (inference_model(inputs["image"]), graph(tf.constant(inputs["image"]))):
        assert tuple(out["lengths"].shape) == (n, 10) and tuple(out["recon"].shape) == (n, 784)
        assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(out["lengths"], "float32"))))
    if n:
        compile_capsnet(train_model)
        assert np.isfinite(train_model.train_on_batch(inputs, targets)[0])


def test_models_have_named_dynamic_batch_inputs_and_outputs(models):
    train_model, inference_model = models
    assert {t.name for t in train_model.inputs} == {"image", "label"}
    assert [t.name for t in inference_model.inputs] == ["image"]
    for model in models:
        assert list(model.output_names) == ["lengths", "recon"]
        for t in model.inputs + model.outputs:
            assert t.shape[0] is None


def test_parameter_counts(models):
    train_model, inference_model = models
    assert count(train_model.trainable_weights) == TOTAL_PARAMS
    assert count(train_model.non_trainable_weights) == 0
    assert count(inference_model.trainable_weights) == TOTAL_PARAMS
    capsules = [train_model.get_layer(n) for n in ("conv1", "primary_caps", "digit_caps")]
    assert sum(count(layer.trainable_weights) for layer in capsules) == WITHOUT_DECODER
    assert count(train_model.get_layer("decoder").trainable_weights) == DECODER_PARAMS


def test_models_share_every_weight(models):
    train_model, inference_model = models
    assert [id(v) for v in train_model.weights] == [id(v) for v in inference_model.weights]


def test_build_arguments_reach_digit_caps():
    train_model, _ = build_capsnet(routings=1, stop_gradient_routing=True)
    layer = train_model.get_layer("digit_caps")
    assert isinstance(layer, DigitCaps)
    assert layer.routings == 1 and layer.stop_gradient_routing is True
    assert count(train_model.trainable_weights) == TOTAL_PARAMS


def test_decoder_is_masked_by_true_label_in_training_and_longest_capsule_in_inference():
    keras.utils.set_random_seed(4)
    train_model, inference_model = build_capsnet()
    # At initialisation |v| ~ 1e-7 and every reconstruction is ~0.5: enlarge W so masks matter.
    digit_caps = train_model.get_layer("digit_caps")
    digit_caps.kernel.assign(np.random.default_rng(4).normal(size=digit_caps.kernel.shape))
    inputs, _ = batch(3, seed=1)
    image = inputs["image"]
    inferred = inference_model(image)
    lengths = ops.convert_to_numpy(inferred["lengths"])
    assert lengths.max() > 1e-3
    longest = np.argmax(lengths, axis=-1)
    caps = keras.Model(train_model.get_layer("image").output, digit_caps.output)(image)
    decoder = train_model.get_layer("decoder")

    # Inference: decoder(Mask(v)) masks by the longest capsule.
    np.testing.assert_allclose(ops.convert_to_numpy(inferred["recon"]),
                               ops.convert_to_numpy(decoder(Mask()(caps))), atol=1e-6)
    # Training with label == longest capsule reconstructs exactly like inference ...
    same = np.eye(10, dtype="float32")[longest]
    recon_same = ops.convert_to_numpy(train_model({"image": image, "label": same})["recon"])
    np.testing.assert_allclose(recon_same, ops.convert_to_numpy(inferred["recon"]), atol=1e-6)
    # ... and with any other label it follows the label: decoder(Mask([v, label])).
    other = np.eye(10, dtype="float32")[(longest + 1) % 10]
    recon_other = ops.convert_to_numpy(train_model({"image": image, "label": other})["recon"])
    np.testing.assert_allclose(recon_other, ops.convert_to_numpy(decoder(Mask()([caps, other]))),
                               atol=1e-6)
    assert np.abs(recon_other - recon_same).max() > 1e-5  # >> the 1e-6 tolerance above


def test_compile_losses_weights_and_metric_names():
    keras.utils.set_random_seed(1)
    train_model, _ = build_capsnet()
    compile_capsnet(train_model, learning_rate=1e-3)
    assert isinstance(train_model.optimizer, keras.optimizers.Adam)
    assert float(ops.convert_to_numpy(train_model.optimizer.learning_rate)) == pytest.approx(1e-3)
    inputs, targets = batch(4)
    result = train_model.evaluate(inputs, targets, verbose=0, return_dict=True)
    assert set(result) == {"loss", "lengths_loss", "recon_loss", "lengths_accuracy"}
    out = train_model.predict(inputs, verbose=0)
    margin = float(np.mean(ops.convert_to_numpy(margin_loss(targets["lengths"], out["lengths"]))))
    recon = float(np.mean(ops.convert_to_numpy(reconstruction_loss(targets["recon"],
                                                                   out["recon"]))))
    assert result["lengths_loss"] == pytest.approx(margin, rel=1e-5)
    assert result["recon_loss"] == pytest.approx(recon, rel=1e-5)
    assert result["loss"] == pytest.approx(margin + RECON_WEIGHT * recon, rel=1e-5)
    accuracy = np.mean(np.argmax(out["lengths"], -1) == np.argmax(targets["lengths"], -1))
    assert result["lengths_accuracy"] == pytest.approx(accuracy)


def test_a_few_training_steps_lower_the_loss():
    """8 Adam steps on one batch of 4. Also guards against a Length eps that swamps the ~1e-7
    capsule lengths at initialisation (the margin loss would then stay frozen at 0.80943)."""
    import tensorflow as tf  # tf.data only; the model itself is backend-agnostic

    keras.utils.set_random_seed(2)
    train_model, inference_model = build_capsnet()
    compile_capsnet(train_model)
    inputs, targets = batch(4)
    before = train_model.evaluate(inputs, targets, verbose=0, return_dict=True)
    true_len_before = ops.convert_to_numpy(inference_model(inputs["image"])["lengths"])[
        np.arange(4), np.arange(4)]

    ds = tf.data.Dataset.from_tensors((inputs, targets)).repeat()
    history = train_model.fit(ds, epochs=2, steps_per_epoch=4,
                              validation_data=tf.data.Dataset.from_tensors((inputs, targets)),
                              verbose=0)
    assert set(history.history) == {
        "loss", "lengths_loss", "recon_loss", "lengths_accuracy",
        "val_loss", "val_lengths_loss", "val_recon_loss", "val_lengths_accuracy"}
    after = train_model.evaluate(inputs, targets, verbose=0, return_dict=True)
    assert all(np.isfinite(v) for v in after.values())
    assert all(np.isfinite(v) for vs in history.history.values() for v in vs)
    assert after["loss"] < before["loss"] - 1e-3
    assert after["lengths_loss"] < before["lengths_loss"] - 1e-3
    assert after["recon_loss"] < before["recon_loss"]
    true_len_after = ops.convert_to_numpy(inference_model(inputs["image"])["lengths"])[
        np.arange(4), np.arange(4)]
    assert np.all(true_len_after > 10 * true_len_before)
    assert all(np.all(np.isfinite(ops.convert_to_numpy(w))) for w in train_model.weights)


def test_save_and_reload_gives_identical_predictions(tmp_path):
    keras.utils.set_random_seed(3)
    train_model, inference_model = build_capsnet(routings=2)
    compile_capsnet(train_model)
    inputs, targets = batch(3)
    train_model.train_on_batch(inputs, targets)  # non-initial weights and optimizer state
    expected = train_model.predict(inputs, verbose=0)

    train_model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")  # no custom_objects
    got = reloaded.predict(inputs, verbose=0)
    for key in ("lengths", "recon"):
        np.testing.assert_array_equal(got[key], expected[key])
    assert reloaded.get_layer("digit_caps").routings == 2
    assert count(reloaded.trainable_weights) == TOTAL_PARAMS
    # The compile state comes back too: same losses, and it trains.
    np.testing.assert_allclose(reloaded.evaluate(inputs, targets, verbose=0),
                               train_model.evaluate(inputs, targets, verbose=0), rtol=1e-5)
    assert np.isfinite(reloaded.train_on_batch(inputs, targets)[0])

    inference_model.save(tmp_path / "inference.keras")
    reloaded_inference = keras.saving.load_model(tmp_path / "inference.keras")
    np.testing.assert_array_equal(
        reloaded_inference.predict(inputs["image"], verbose=0)["lengths"],
        inference_model.predict(inputs["image"], verbose=0)["lengths"])
