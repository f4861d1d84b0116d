"""Child process for tests/models/test_mirrored.py: trains the real CapsNet a few steps through
the Trainer's own code (models.trainer.build_models: MirroredStrategy, model, losses, optimizer;
models.trainer.train: its training loop) on N logical CPU devices, and prints one JSON line.

  python tests/models/mirrored_child.py --replicas N --mnist-cache DIR --weights W.weights.h5
      --out RESULT.npz

TensorFlow fixes its devices when its runtime starts, so the logical devices are configured
first, with local_runner.py's own function (pipeline.tf_runtime), before any TF op runs.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from pipeline import tf_runtime  # noqa: E402  (light: no TensorFlow at import)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument("--mnist-cache", required=True)
    p.add_argument("--weights", required=True, help="initial weights to load")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    if args.replicas > 1:
        tf_runtime.configure_cpu_replicas(args.replicas)  # before any TF op
    import keras
    import numpy as np
    import tensorflow as tf

    from data import mnist
    from models import features, trainer
    from models.capsnet.recipe import Recipe

    images = mnist.load(cache_dir=args.mnist_cache, allow_network=False)[0]
    n = args.steps * args.batch
    transformed = {  # what Transform writes: pixels / 255, labels
        features.transformed_name(features.IMAGE_KEY):
            images.x_train[:n, :, :, None].astype("float32") / 255.0,
        features.transformed_name(features.LABEL_KEY): images.y_train[:n].astype("int64"),
    }
    dataset = (tf.data.Dataset.from_tensor_slices(transformed).batch(args.batch)
               .map(lambda batch: trainer.to_model_io(batch, max_shift=0)))  # no augmentation

    # float32: the replicas' losses are compared with the single device's at rtol 1e-4.
    config = Recipe(epochs=1, batch_size=args.batch, lr_decay=1.0, max_shift=0,
                    mixed_precision="none")
    strategy, train_model, _ = trainer.build_models(config, args.steps)
    train_model.load_weights(args.weights)

    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))  # the running mean over the epoch so far

    trainer.train(strategy, train_model, lambda epoch: dataset, dataset.take(1), epochs=1,
                  initial_epoch=0, steps_per_epoch=args.steps,
                  callbacks=[trainer.StopOnNonFiniteLoss(), Record()])
    np.savez(args.out, *[w for w in train_model.get_weights()])
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),
        "losses": losses,
    }), flush=True)


if __name__ == "__main__":
    main()
