"""The committed pretrained model, pretrained/capsnet_mnist.keras, against its model card
(pretrained/README.md): the file is the one the card names (SHA-256), it loads with nothing but
`import models.capsnet` and Keras, and it misclassifies exactly the card's count of the official
10,000 test images, read with the project's data layer."""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "pretrained", "capsnet_mnist.keras")
CARD = os.path.join(REPO, "pretrained", "README.md")
TRANSFORM = os.path.join(REPO, "pretrained", "transform_graph")


def card_value(pattern: str) -> str:
    with open(CARD) as f:
        match = re.search(pattern, f.read())
    assert match, f"the model card has no line matching {pattern!r}"
    return match.group(1)


def test_the_file_is_the_one_the_card_names():
    with open(MODEL, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == card_value(r"SHA-256: `([0-9a-f]{64})`")


def test_it_loads_with_models_capsnet_and_keras_alone():
    """In a fresh interpreter: no other import of the project's, no custom_objects."""
    code = ("import sys, keras, models.capsnet\n"
            "m = keras.saving.load_model(sys.argv[1])\n"
            "print(m.count_params())")
    proc = subprocess.run([sys.executable, "-c", code, MODEL], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == card_value(r"Parameters: ([\d]+)")


def test_it_makes_the_cards_count_of_test_errors(mnist_arrays):
    import keras

    from models.capsnet import visualize
    from models.capsnet.model import LENGTHS

    model = keras.saving.load_model(MODEL, compile=False)
    lengths = model.predict(visualize.to_model_input(mnist_arrays.x_test), batch_size=500,
                            verbose=0)[LENGTHS]
    errors = int(np.sum(np.argmax(lengths, axis=-1) != mnist_arrays.y_test))
    assert len(mnist_arrays.y_test) == 10_000
    assert errors == int(card_value(r"Test errors: (\d+) of 10,000"))


def test_it_serves_through_a_savedmodel_export(tmp_path, mnist_arrays, capsys):
    """python -m models.serving: the pretrained model and the committed Transform graph as the
    SavedModel a Trainer exports; its serving_images classes equal the Keras model's."""
    import keras
    import tensorflow as tf

    from models.capsnet import visualize
    from models.capsnet.model import LENGTHS

    export = tmp_path / "capsnet" / "1"
    proc = subprocess.run([sys.executable, "-m", "models.serving", "--model", MODEL,
                           "--transform-graph", TRANSFORM, "--export-dir", str(export)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = mnist_arrays.x_test[:300]
    served = tf.saved_model.load(str(export)).signatures["serving_images"](
        images=tf.constant(images))
    model = keras.saving.load_model(MODEL, compile=False)
    expected = np.argmax(model.predict(visualize.to_model_input(images), verbose=0)[LENGTHS], -1)
    np.testing.assert_array_equal(served["classes"].numpy(), expected)
    from models import serving  # the same command again, in this process: refused
    with pytest.raises(SystemExit) as again:
        serving.main(["--model", MODEL, "--transform-graph", TRANSFORM,
                      "--export-dir", str(export)])
    assert again.value.code == 2 and "exists; expected a new directory" in capsys.readouterr().err
