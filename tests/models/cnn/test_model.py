"""models/cnn, the paper's baseline CNN: its parameter count (the paper's 35.4M, which fixes the
padding), its shapes and dtypes, and its export: the same two serving signatures as the
CapsNet's, reloaded and answering as the Keras model does."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from models import features, networks, serving
from models.capsnet import build_capsnet
from models.capsnet.recipe import default_recipe
from models.cnn.model import CONV1, PARAMETERS, PROBABILITIES, build_cnn, compile_cnn
from tests.conftest import REPO

TRANSFORM_GRAPH = os.path.join(REPO, "pretrained", "transform_graph")


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    return build_cnn()[1]


def test_the_parameter_count_is_the_papers_and_fixes_same_padding(cnn):
    assert cnn.count_params() == PARAMETERS == 35_445_522
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in cnn.layers}
    assert shapes[CONV1] == shapes["conv2"] == (28, 28, 256) and shapes["conv3"] == (28, 28, 128)
    assert (shapes["flatten"], shapes["fc1"], shapes["fc2"]) == ((100352,), (328,), (192,))
    assert shapes[PROBABILITIES] == (10,)
    # With VALID padding the same layers hold about 13M parameters: the count tells them apart.
    valid = keras.Sequential([keras.Input((28, 28, 1)), *[
        keras.layers.Conv2D(c, 5) for c in (256, 256, 128)], keras.layers.Flatten(),
        keras.layers.Dense(328), keras.layers.Dense(192), keras.layers.Dense(10)])
    assert abs(valid.count_params() - 13e6) < 0.5e6


def test_train_and_inference_are_one_model_with_dropout_in_training_only(cnn, mnist_arrays):
    train, inference = build_cnn()
    assert train is inference
    x = mnist_arrays.x_test[:8, ..., None].astype("float32") / 255.0
    np.testing.assert_array_equal(cnn(x, training=False)[PROBABILITIES],
                                  cnn(x, training=False)[PROBABILITIES])
    assert not np.array_equal(cnn(x, training=True)[PROBABILITIES],
                              cnn(x, training=False)[PROBABILITIES])


def test_bfloat16_computes_in_16_bits_and_answers_in_float32(mnist_arrays):
    model, _ = build_cnn(dtype_policy="mixed_bfloat16")
    compile_cnn(model)
    assert networks.policy_of(model) == "mixed_bfloat16"
    assert model.get_layer(CONV1).compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)
    out = model(mnist_arrays.x_test[:4, ..., None].astype("float32") / 255.0)[PROBABILITIES]
    assert out.dtype == "float32"
    np.testing.assert_allclose(np.sum(out, axis=-1), 1.0, atol=1e-5)
    # Saved for serving: a float32 copy without the optimizer state (a third of the size).
    copy = networks.with_dtype_policy(networks.CNN, default_recipe("cnn"), model, None)
    assert copy is not model and networks.policy_of(copy) is None
    assert getattr(copy, "optimizer", None) is None


def test_the_networks_feed_their_models_the_same_images_and_labels():
    images, onehot = np.zeros((2, 28, 28, 1), "float32"), np.eye(10, dtype="float32")[:2]
    inputs, targets = networks.CNN.model_io(images, onehot)
    assert inputs is images and set(targets) == {PROBABILITIES}
    inputs, targets = networks.CAPSNET.model_io(images, onehot)
    assert set(inputs) == {"image", "label"} and tuple(targets["recon"].shape) == (2, 784)
    with pytest.raises(ValueError, match=r"unknown network 'resnet'; expected one of "
                                         r"\['capsnet', 'cnn'\]"):
        networks.get("resnet")


def signature_shapes(export_dir):
    """{signature: ({input: (dtype, shape)}, {output: (dtype, shape)})} of a SavedModel."""
    loaded = tf.saved_model.load(export_dir)

    def shape(spec):
        return None if spec.shape.rank is None else spec.shape.as_list()

    result = {}
    for name, fn in loaded.signatures.items():
        inputs = {k: (v.dtype, shape(v)) for k, v in fn.structured_input_signature[1].items()}
        outputs = {k: (v.dtype, shape(v)) for k, v in fn.structured_outputs.items()}
        result[name] = (inputs, outputs)
    return result, loaded


def test_export_has_the_capsnets_signatures_and_answers_as_the_model(cnn, tmp_path,
                                                                     mnist_arrays):
    transform = tft.TFTransformOutput(TRANSFORM_GRAPH)
    serving.export_serving_model(cnn, transform, str(tmp_path / "cnn"))
    keras.utils.set_random_seed(0)
    serving.export_serving_model(build_capsnet()[1], transform, str(tmp_path / "capsnet"))
    cnn_signatures, loaded = signature_shapes(str(tmp_path / "cnn"))
    capsnet_signatures, _ = signature_shapes(str(tmp_path / "capsnet"))
    assert cnn_signatures == capsnet_signatures
    assert set(cnn_signatures) == {"serving_default", serving.IMAGES_SIGNATURE}

    images = mnist_arrays.x_test[:16]
    served = loaded.signatures[serving.IMAGES_SIGNATURE](images=tf.constant(images))
    expected = cnn.predict(images[..., None].astype("float32") / 255.0, verbose=0)
    np.testing.assert_allclose(served[features.SCORES], expected[PROBABILITIES], atol=1e-5)
    np.testing.assert_array_equal(served[features.CLASSES],
                                  np.argmax(expected[PROBABILITIES], -1))

    reloaded = keras.saving.load_model(str(tmp_path / "cnn" / networks.CNN.keras_file))
    assert reloaded.name == "cnn" and getattr(reloaded, "optimizer", None) is None
    for a, b in zip(reloaded.get_weights(), cnn.get_weights()):
        np.testing.assert_array_equal(a, b)
    with open(tmp_path / "cnn" / "assets.extra" / serving.MODEL_INFO_FILE) as f:
        info = json.load(f)
    assert info["network"] == "cnn" and info["trainable_params"] == PARAMETERS
