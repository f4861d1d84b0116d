"""models.capsnet.visualize on an untrained CapsNet: the pictures come from the model's decoder,
the grids have the seed's layout, the PNGs their exact pixel sizes, and the CLI finds the model;
on the committed pretrained one: each digit's example is a typical image of it."""

import os

import keras
import matplotlib.image
import numpy as np
import pytest

from models.capsnet import build_capsnet, visualize
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_capsnet()[1]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return (rng.uniform(size=(4, 28, 28)) < 0.2).astype("uint8") * 255


def test_deltas_are_the_papers_figure_4():
    assert visualize.DELTAS == (-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


def test_reconstructions_are_the_models_own(model, images):
    classes, recons = visualize.reconstruct(model, images)
    out = model(visualize.to_model_input(images), training=False)
    assert recons.shape == (4, 28, 28) and classes.shape == (4,)
    lengths = keras.ops.convert_to_numpy(out["lengths"])
    np.testing.assert_array_equal(classes, np.argmax(lengths, axis=-1))
    np.testing.assert_allclose(recons.reshape(4, -1), keras.ops.convert_to_numpy(out["recon"]),
                               atol=1e-5)


def test_manipulation_perturbs_each_dimension_of_the_predicted_capsule(model, images):
    predicted, pictures = visualize.manipulate(model, images[0])
    classes, recons = visualize.reconstruct(model, images[:1])
    assert predicted == classes[0]
    assert pictures.shape == (16, 11, 28, 28)
    assert 0.0 <= pictures.min() and pictures.max() <= 1.0
    # The middle column adds 0: every row is the plain reconstruction.
    for row in pictures[:, visualize.DELTAS.index(0.0)]:
        np.testing.assert_allclose(row, recons[0], atol=1e-5)
    # Every dimension changes the picture, and differently from the others.
    ends = pictures[:, -1] - pictures[:, 0]
    assert all(np.abs(e).max() > 1e-6 for e in ends)
    assert not np.allclose(ends[0], ends[1])


def test_grids_have_the_seed_layout(model, images):
    _, recons = visualize.reconstruct(model, images[:3])
    grid = visualize.real_and_reconstructed(images[:3], recons, cols=2)
    assert grid.shape == (4 * 28, 2 * 28)  # 2 rows of real digits, each above its recons
    np.testing.assert_allclose(grid[:28, 28:56], images[1] / 255.0)
    np.testing.assert_allclose(grid[28:56, :28], recons[0])
    np.testing.assert_allclose(grid[56:84, :28], images[2] / 255.0)
    assert not grid[56:, 28:].any()  # the missing 4th digit is black
    tiled = visualize.tile(np.arange(2 * 3 * 28 * 28, dtype="float32").reshape(2, 3, 28, 28))
    assert tiled.shape == (56, 84)
    assert tiled[28, 56] == (1 * 3 + 2) * 28 * 28  # row 1, column 2, its top-left pixel


def test_png_has_the_exact_pixel_size(tmp_path):
    picture = np.linspace(0, 1, 28 * 56).reshape(28, 56)
    path = visualize.save_png(picture, str(tmp_path / "sub" / "p.png"), scale=3)
    read = matplotlib.image.imread(path)
    assert read.shape[:2] == (84, 168)
    np.testing.assert_allclose(read[::3, ::3, 0], picture, atol=1 / 255 + 1e-6)  # 8-bit, truncated


def test_find_keras_model_accepts_every_layout(tmp_path):
    def touch(*parts):
        path = tmp_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return str(path)

    version = touch("serving", "1700000002", visualize.KERAS_MODEL_FILE)
    touch("serving", "1700000001", visualize.KERAS_MODEL_FILE)
    (tmp_path / "serving" / ".tmp-1700000003-abc").mkdir()  # a push in progress
    trained = touch("Trainer", "model", "8", "Format-Serving", visualize.KERAS_MODEL_FILE)
    find = visualize.find_keras_model
    assert find(str(tmp_path / "serving")) == version  # the newest version
    assert find(str(tmp_path / "serving" / "1700000002")) == version
    assert find(str(tmp_path / "Trainer" / "model" / "8")) == trained
    assert find(str(tmp_path / "Trainer" / "model" / "8" / "Format-Serving")) == trained
    assert find(trained) == trained
    with pytest.raises(FileNotFoundError, match="re-run the Trainer"):
        find(str(tmp_path / "Trainer"))


def test_cli_writes_the_pictures_of_a_saved_model(model, tmp_path, mnist_arrays, mnist_cache_dir,
                                                  capsys):
    version_dir = tmp_path / "serving_model" / "1700000000"
    keras_file = version_dir / visualize.KERAS_MODEL_FILE
    keras_file.parent.mkdir(parents=True)
    model.save(str(keras_file))
    loaded = visualize.load_inference_model(str(version_dir))
    x = visualize.to_model_input(mnist_arrays.x_test[:2])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)["recon"]),
                               keras.ops.convert_to_numpy(model(x)["recon"]), atol=1e-6)

    out = tmp_path / "pictures"
    assert visualize.main(["--model", str(tmp_path / "serving_model"), "--out", str(out),
                           "--n", "15", "--digits", "7", "--scale", "1",
                           "--data-cache-dir", mnist_cache_dir]) == 0
    assert sorted(os.listdir(out)) == ["manipulate-7.png", "real_and_recon.png"]
    assert matplotlib.image.imread(str(out / "real_and_recon.png")).shape[:2] == (4 * 28, 280)
    assert matplotlib.image.imread(str(out / "manipulate-7.png")).shape[:2] == (16 * 28, 11 * 28)
    printed = capsys.readouterr().out
    assert str(keras_file) in printed and "Digit 7 (test image " in printed


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        visualize.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--out", "--n", "--digits", "--scale", "--data-cache-dir"):
        assert flag in help_text
    assert "default 50" in help_text and "default 2" in help_text


def test_an_example_is_the_longest_capsule_among_its_digits_classified_right():
    labels = np.array([3, 8, 3, 8, 3, 3])
    lengths = np.full((6, 10), 0.1)
    lengths[[0, 0, 1, 2, 3, 4, 5], [3, 5, 8, 3, 8, 3, 3]] = [0.97, 0.99, 0.7, 0.6, 0.9, 0.95, 0.5]
    # image 0, a 3 classified as a 5, has the longest 3-capsule: not a typical 3
    assert visualize.pick_examples(labels, lengths, [3, 8]) == {3: 4, 8: 3}
    wrong = lengths.copy()
    wrong[:, 0] = 1.0  # every image classified as a 0: the longest 3-capsule of all the 3s
    assert visualize.pick_examples(labels, wrong, [3]) == {3: 0}
    with pytest.raises(ValueError, match="no image of digit 7"):
        visualize.pick_examples(labels, lengths, [7])
    with pytest.raises(ValueError, match=r"lengths must be \[N, n_class\] for the N = 6 labels, "
                                         r"got shape \(5, 10\)"):
        visualize.pick_examples(labels, lengths[:5], [3])


def test_the_pretrained_models_examples_are_typical(mnist_arrays, tmp_path):
    """With the committed model: each digit's example is of that digit, classified right, and
    of those the one with the longest capsule (by the model's own lengths output), so for the 3
    not test image 18, the first 3 classified right, which decodes as a 'b'."""
    model = visualize.load_inference_model(os.path.join(REPO, "pretrained", "capsnet_mnist.keras"))
    images, labels = mnist_arrays.x_test[:200], mnist_arrays.y_test[:200]
    examples = visualize.write_pictures(model, images, labels, str(tmp_path), n=1,
                                        scale=1, search=200)["examples"]
    lengths = keras.ops.convert_to_numpy(
        model(visualize.to_model_input(images), training=False)["lengths"])
    right = np.argmax(lengths, axis=-1) == labels
    assert sorted(examples) == list(range(10))
    for digit, index in examples.items():
        assert labels[index] == digit and right[index]
        assert lengths[index, digit] == lengths[right & (labels == digit), digit].max()
    assert examples[3] != 18 and right[18] and labels[18] == 3
