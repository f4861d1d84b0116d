"""Export of a trained network (the CapsNet, or the baseline CNN) as a SavedModel with two serving
signatures.

  serving_default(examples: string [N])      serialized raw tf.Examples (the ExampleGen format);
                                             parsed and normalised by the Transform graph.
  serving_images(images: uint8 [N,28,28] or [N,28,28,1])
                                             raw pixels; packed into the same raw bytes and sent
                                             through the same Transform graph.
Both return {'scores': float32 [N, 10], 'classes': int64 [N] argmax}: the capsule lengths of the
CapsNet, the softmax probabilities of the CNN. Next to them, `keras/<network>.keras`
(`Network.keras_file`) keeps the whole Keras inference model, the CapsNet's decoder included,
for the capsule pictures of `models.capsnet.visualize` (the signatures expose no decoder).

The Keras 3 inference model and the tf.Transform layer (a tf_keras layer) are tracked by one
`keras.export.ExportArchive`, so the SavedModel carries the model weights and the transform
graph's assets together.
"""

import json
import os
from typing import Optional

import keras
import tensorflow as tf

from models import features, networks

IMAGES_SIGNATURE = "serving_images"
MODEL_INFO_FILE = "model_info.json"  # under assets.extra/, ignored by TF Serving

# One-byte strings 0x00..0xff: gathering pixels into it and joining rebuilds the raw image bytes.
_BYTE_STRINGS = [bytes([i]) for i in range(256)]


def images_to_raw_bytes(images: tf.Tensor) -> tf.Tensor:
    """uint8 [N, 28, 28] or [N, 28, 28, 1] -> string [N, 1], each 784 bytes, row-major.

    Any other shape fails with an InvalidArgumentError naming the expected shapes and the one given.
    """
    shape = tf.shape(images)
    rank = tf.size(shape)
    dims = tf.concat([shape, tf.ones([4], tf.int32)], axis=0)[:4]  # [N, H, W, C], C = 1 if absent
    size = features.IMAGE_SIZE
    shape_ok = ((rank == 3) | (rank == 4)) & (dims[1] == size) & (dims[2] == size) & (dims[3] == 1)
    check = tf.debugging.Assert(shape_ok, [
        f"images must be uint8 [N,{size},{size}] or [N,{size},{size},1]; got shape", shape])
    with tf.control_dependencies([check]):
        flat = tf.reshape(images, [dims[0], features.NUM_PIXELS])
    pixels = tf.gather(tf.constant(_BYTE_STRINGS), tf.cast(flat, tf.int32))  # [N, 784] strings
    return tf.strings.reduce_join(pixels, axis=-1, keepdims=True)


def _outputs(model: keras.Model, images: tf.Tensor, scores_key: str) -> dict:
    scores = model(images, training=False)[scores_key]
    return {features.SCORES: scores, features.CLASSES: tf.argmax(scores, axis=-1)}


def export_serving_model(model: keras.Model, tft_output, export_dir: str,
                         trained_with: Optional[dict] = None) -> None:
    """Writes the SavedModel with both signatures, assets.extra/model_info.json and the .keras file.

    Args:
      model: the inference model of a network of `models.networks` (known by its name), image
        [N,28,28,1] float32 -> {<its scores>: [N,10], ...}; the signatures compute in its dtype
        policy (the Trainer passes a float32 one by default).
      tft_output: tft.TFTransformOutput of the Transform component.
      export_dir: destination (the Trainer's serving_model_dir).
      trained_with: how training computed (`hardware.describe`), recorded in model_info.json.
    """
    network = networks.of_model(model)
    tft_layer = tft_output.transform_features_layer()
    raw_spec = tft_output.raw_feature_spec()
    raw_spec.pop(features.LABEL_KEY)  # serving requests carry no label
    image_xf = features.transformed_name(features.IMAGE_KEY)

    image_spec = tf.TensorSpec([None, features.IMAGE_SIZE, features.IMAGE_SIZE, 1], tf.float32)

    @tf.function(input_signature=[image_spec])
    def classify(images):
        """The network on transformed images, traced once for both signatures (a trace of the
        CapsNet costs seconds)."""
        return _outputs(model, images, network.scores)

    @tf.function
    def serve_examples(examples):
        return classify(tft_layer(tf.io.parse_example(examples, raw_spec))[image_xf])

    @tf.function
    def serve_images(images):
        return classify(tft_layer({features.IMAGE_KEY: images_to_raw_bytes(images)})[image_xf])

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(tft_layer)
    archive.add_endpoint("serving_default", serve_examples,
                         input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    archive.add_endpoint(IMAGES_SIGNATURE, serve_images,
                         input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    archive.write_out(export_dir, verbose=False)
    _write_model_info(model, export_dir, trained_with)
    tf.io.gfile.makedirs(os.path.dirname(os.path.join(export_dir, network.keras_file)))
    model.save(os.path.join(export_dir, network.keras_file))


def _write_model_info(model: keras.Model, export_dir: str, trained_with: Optional[dict]) -> None:
    """Records which Keras built the model (tests and users check it is Keras 3), the serving
    graph's compute dtype and how training computed (CPU, bf16 support, runtime, dtype)."""
    info = {
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "network": model.name,
        "trainable_params": int(sum(keras.ops.size(w) for w in model.trainable_weights)),
        "serving_compute_dtype": model.get_layer(networks.FIRST_LAYER).compute_dtype,
        "training": trained_with or {},
    }
    extra = os.path.join(export_dir, "assets.extra")
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, MODEL_INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)


def classify(export_dir: str, images, batch_size: int = 100):
    """(classes int64 [N], scores float32 [N, 10]) of uint8 images [N, 28, 28] through an
    export's `serving_images` signature, `batch_size` images a call."""
    import numpy as np

    serve = tf.saved_model.load(export_dir).signatures[IMAGES_SIGNATURE]
    classes, scores = [], []
    for start in range(0, len(images), batch_size):
        out = serve(images=tf.constant(images[start:start + batch_size]))
        classes.append(out[features.CLASSES].numpy())
        scores.append(out[features.SCORES].numpy())
    return np.concatenate(classes), np.concatenate(scores)


def main(argv=None) -> int:
    """The SavedModel of a saved Keras inference model (the CapsNet, e.g.
    pretrained/capsnet_mnist.keras, or the baseline CNN) with both signatures, through a
    Transform graph (e.g. pretrained/transform_graph): what a Trainer exports, without a
    pipeline run."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m models.serving", description=main.__doc__)
    p.add_argument("--model", required=True,
                   help="a .keras inference model (CapsNet or CNN)")
    p.add_argument("--transform-graph", required=True,
                   help="a Transform component's transform_graph output dir")
    p.add_argument("--export-dir", required=True,
                   help="where the SavedModel goes (a TF Serving version dir, e.g. "
                        "/models/capsnet/1); must not exist yet")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if tf.io.gfile.exists(args.export_dir):
        p.error(f"--export-dir {args.export_dir} exists; expected a new directory")
    import tensorflow_transform as tft

    model = keras.saving.load_model(args.model, compile=False)
    export_serving_model(model, tft.TFTransformOutput(args.transform_graph), args.export_dir)
    print(f"SavedModel with signatures serving_default (tf.Example) and {IMAGES_SIGNATURE} "
          f"(uint8 images): {args.export_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
