"""What the digit capsules encode, as pictures decoded by the trained CapsNet's own decoder.

  real_and_recon.png   test digits (odd rows) above their reconstructions (even rows): the
                       decoder fed with the longest capsule only, as at inference.
  manipulate-<d>.png   Figure 4 of the paper: a typical test image of digit d (`pick_examples`);
                       each of the 16 dimensions of its predicted capsule (rows) shifted by
                       -0.25, -0.20, ..., +0.25 (columns, the unchanged capsule in the middle)
                       and decoded.

    python -m models.capsnet.visualize --model outputs/serving_model --out outputs/pictures

`--model` takes what the pipeline leaves behind: a pushed version dir (or the serving dir, for
its newest version), a Trainer model dir or its Format-Serving dir, or a .keras file. The Trainer
writes the Keras inference model to `<SavedModel dir>/keras/capsnet.keras` (models.serving),
because the SavedModel's signatures serve scores and classes only, not the decoder.

Like the rest of this package: keras, keras.ops and numpy only (matplotlib writes the PNGs).
"""

import argparse
import os
import sys

import keras
import numpy as np

from data.mnist import IMAGE_SIDE
from models.capsnet.model import DECODER, DIGIT_CAPS, KERAS_MODEL_FILE

SERVING_SUBDIR = "Format-Serving"  # the Trainer's SavedModel, inside its model artifact

# Figure 4: every dimension perturbed by [-0.25, 0.25] in steps of 0.05 (11 values, 0 included).
DELTAS = tuple(np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2).tolist())


# --------------------------------------------------------------------------------------------
# Loading the model
# --------------------------------------------------------------------------------------------

def find_keras_model(path: str) -> str:
    """The .keras file behind `path`: a .keras file, a SavedModel dir, a Trainer model dir, or
    a serving dir of numbered versions (the newest version that has one).

    Raises FileNotFoundError naming the places it looked.
    """
    if os.path.isfile(path):
        return path
    candidates = [os.path.join(path, KERAS_MODEL_FILE),
                  os.path.join(path, SERVING_SUBDIR, KERAS_MODEL_FILE)]
    if os.path.isdir(path):
        versions = sorted((v for v in os.listdir(path) if v.isdigit()), key=int, reverse=True)
        candidates += [os.path.join(path, v, KERAS_MODEL_FILE) for v in versions]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"no Keras model at {path}: expected a .keras file, or {KERAS_MODEL_FILE} in a pushed "
        f"version dir, a Trainer model's {SERVING_SUBDIR} dir, or a serving dir's newest version. "
        f"Models exported before the Trainer saved the Keras model have none; re-run the Trainer.")


def load_inference_model(path: str) -> keras.Model:
    """The CapsNet inference model (image -> {'lengths', 'recon'}) saved with a trained model."""
    # Importing this module imported models.capsnet, which registers the custom layers.
    return keras.saving.load_model(find_keras_model(path), compile=False)


# --------------------------------------------------------------------------------------------
# Capsules in, pictures out
# --------------------------------------------------------------------------------------------

def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 pixels [N,28,28] or [N,28,28,1] -> float32 [N,28,28,1] in [0, 1] (as Transform)."""
    images = np.asarray(images)
    return (images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1) / 255.0).astype("float32")


def digit_capsules(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The DigitCaps output v for uint8 images: [N, 10, 16]."""
    capsules = keras.Model(model.input, model.get_layer(DIGIT_CAPS).output)
    v = capsules(to_model_input(images), training=False)
    return keras.ops.convert_to_numpy(v).astype("float32")  # float16 under a mixed policy


def decode(model: keras.Model, capsules: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Decoder output for capsules [N, n_class, dim], keeping only capsule `classes[i]` of row i
    (the Mask layer's rule): [N, 28, 28] in [0, 1]."""
    capsules = np.asarray(capsules, dtype="float32")
    n, n_class, dim = capsules.shape
    keep = np.eye(n_class, dtype="float32")[np.asarray(classes)]  # [N, n_class]
    masked = (capsules * keep[:, :, None]).reshape(n, n_class * dim)
    pixels = model.get_layer(DECODER)(masked, training=False)
    return keras.ops.convert_to_numpy(pixels).reshape(n, IMAGE_SIDE, IMAGE_SIDE)


def reconstruct(model: keras.Model, images: np.ndarray):
    """(predicted classes [N], reconstructions [N, 28, 28]) from the longest capsule."""
    capsules = digit_capsules(model, images)
    classes = np.argmax(np.sum(np.square(capsules), axis=-1), axis=-1)
    return classes, decode(model, capsules, classes)


def manipulate(model: keras.Model, image: np.ndarray, deltas=DELTAS):
    """Figure 4 for one uint8 image: (predicted class, decoded pictures [dim, len(deltas), 28, 28]).

    Row d, column k: the predicted class's capsule with deltas[k] added to its dimension d.
    """
    capsules = digit_capsules(model, np.asarray(image)[None])  # [1, n_class, dim]
    predicted = int(np.argmax(np.sum(np.square(capsules[0]), axis=-1)))
    dim = capsules.shape[-1]
    batch = np.repeat(capsules, dim * len(deltas), axis=0).reshape(
        dim, len(deltas), *capsules.shape[1:])
    for d in range(dim):
        batch[d, :, predicted, d] += np.asarray(deltas, dtype="float32")
    decoded = decode(model, batch.reshape(-1, *capsules.shape[1:]),
                     np.full(dim * len(deltas), predicted))
    return predicted, decoded.reshape(dim, len(deltas), IMAGE_SIDE, IMAGE_SIDE)


def tile(pictures: np.ndarray) -> np.ndarray:
    """[rows, cols, h, w] -> one [rows * h, cols * w] picture (no gaps, like the seed's grids)."""
    rows, cols, h, w = pictures.shape
    return pictures.transpose(0, 2, 1, 3).reshape(rows * h, cols * w)


def real_and_reconstructed(images: np.ndarray, recons: np.ndarray, cols: int = 10) -> np.ndarray:
    """Rows of `cols` real digits, each followed by the row of their reconstructions.

    images uint8 [N,28,28(,1)], recons [N,28,28] in [0, 1] -> [2 * ceil(N/cols) * 28, cols * 28]
    in [0, 1]; a last incomplete row is padded with black.
    """
    real = np.asarray(images, dtype="float32").reshape(-1, IMAGE_SIDE, IMAGE_SIDE) / 255.0
    n = len(real)
    rows = -(-n // cols)
    pad = np.zeros((rows * cols - n, IMAGE_SIDE, IMAGE_SIDE), "float32")
    real = np.concatenate([real, pad]).reshape(rows, 1, cols, IMAGE_SIDE, IMAGE_SIDE)
    recon = np.concatenate([np.asarray(recons, "float32"), pad]).reshape(real.shape)
    pairs = np.concatenate([real, recon], axis=1)  # [rows, 2, cols, 28, 28]
    return tile(pairs.reshape(2 * rows, cols, IMAGE_SIDE, IMAGE_SIDE))


def save_png(picture: np.ndarray, path: str, scale: int = 1) -> str:
    """Writes a [H, W] picture in [0, 1] as a grey PNG of exactly [H * scale, W * scale] px."""
    import matplotlib.image  # only here: the model code above needs no plotting library

    picture = np.clip(np.asarray(picture, dtype="float32"), 0.0, 1.0)
    picture = np.kron(picture, np.ones((scale, scale), "float32"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # As RGB, not through a 256-entry colormap, which would bin the values once more.
    matplotlib.image.imsave(path, np.repeat(picture[..., None], 3, axis=-1), format="png")
    return path


# --------------------------------------------------------------------------------------------
# The pictures of a trained model
# --------------------------------------------------------------------------------------------

def pick_examples(labels: np.ndarray, lengths: np.ndarray, digits) -> dict:
    """{digit: index of a typical image of it}: of the digit's images that the model classifies
    right (all of them if none), the one whose capsule of the digit is longest: the one the
    model is surest of. (The first one classified right can be odd: test image 18, a 3 that
    decodes as a 'b' in every row of Figure 4.)

    labels [N] ints; lengths [N, n_class]: the lengths of the images' digit capsules.
    """
    labels, lengths = np.asarray(labels), np.asarray(lengths)
    if lengths.ndim != 2 or len(lengths) != len(labels):
        raise ValueError(f"lengths must be [N, n_class] for the N = {len(labels)} labels, got "
                         f"shape {lengths.shape}")
    predicted = np.argmax(lengths, axis=-1)
    picked = {}
    for digit in digits:
        indices = np.flatnonzero(labels == digit)
        if len(indices) == 0:
            raise ValueError(f"no image of digit {digit} among the {len(labels)} searched")
        right = indices[predicted[indices] == digit]
        candidates = right if len(right) else indices
        picked[digit] = int(candidates[np.argmax(lengths[candidates, digit])])
    return picked


def write_pictures(model: keras.Model, images: np.ndarray, labels: np.ndarray, out_dir: str,
                   n: int = 50, digits=tuple(range(10)), scale: int = 2,
                   search: int = 200) -> dict:
    """Writes real_and_recon.png (the first n images) and manipulate-<d>.png for each digit,
    from a typical image of d among the first `search` (`pick_examples`).

    Returns {'real_and_recon': path, 'manipulate': {digit: path}, 'examples': {digit: index}}.
    """
    seen = max(n, search)
    capsules = digit_capsules(model, images[:seen])
    lengths = np.linalg.norm(capsules, axis=-1)  # [seen, n_class]
    recons = decode(model, capsules[:n], np.argmax(lengths[:n], axis=-1))
    written = {"real_and_recon": save_png(real_and_reconstructed(images[:n], recons),
                                          os.path.join(out_dir, "real_and_recon.png"), scale),
               "manipulate": {},
               "examples": pick_examples(labels[:seen], lengths, digits)}
    for digit, index in written["examples"].items():
        _, pictures = manipulate(model, images[index])
        written["manipulate"][digit] = save_png(
            tile(pictures), os.path.join(out_dir, f"manipulate-{digit}.png"), scale)
    return written


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m models.capsnet.visualize", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a pushed version dir or the serving dir (its newest version), a Trainer "
                        "model dir or its Format-Serving dir, or a .keras file")
    p.add_argument("--out", required=True, help="directory for the PNG files (created)")
    p.add_argument("--n", type=int, default=50,
                   help="first N official test images to reconstruct (default 50)")
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)),
                   help="digits to draw manipulate-<d>.png for (default: 0 to 9)")
    p.add_argument("--scale", type=int, default=2,
                   help="each model pixel becomes scale x scale PNG pixels (default 2)")
    p.add_argument("--data-cache-dir",
                   help="where the verified mnist.npz is kept "
                        "(default: $MNIST_CACHE_DIR or ~/.cache/capsnet_tfx/mnist)")
    args = p.parse_args(argv)
    if args.n < 1 or args.scale < 1:
        p.error("--n and --scale must be >= 1")
    if any(not 0 <= d <= 9 for d in args.digits):
        p.error(f"--digits must be in 0..9, got {args.digits}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from data import mnist  # the verified official test images, never trained on

    model_file = find_keras_model(args.model)
    model = load_inference_model(model_file)
    test = mnist.load(cache_dir=args.data_cache_dir)[0]
    written = write_pictures(model, test.x_test, test.y_test, args.out, n=args.n,
                             digits=args.digits, scale=args.scale)
    print(f"Model: {model_file}")
    print(f"Real and reconstructed (first {args.n} test images): {written['real_and_recon']}")
    for digit, path in written["manipulate"].items():
        print(f"Digit {digit} (test image {written['examples'][digit]}), 16 dimensions x "
              f"{len(DELTAS)} perturbations: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
