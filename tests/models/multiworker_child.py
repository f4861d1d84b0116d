"""One worker of tests/models/test_multiworker.py: trains the real CapsNet through the Trainer's
own code (models.trainer: make_strategy, build_models, sync_from_chief, from_chief,
train_batches, valid_batches, train) on MNIST, in a cluster if TF_CONFIG names one (run as a
script, one process per worker) or alone (`run`, in the test's own process).

  python tests/models/multiworker_child.py --mnist-cache DIR --weights W.weights.h5 --out R.npz

Two epochs of one step of a global batch of 100 training images, each epoch followed by a pass
over 60 validation images: epoch 1 on real images; epoch 2 on images turned NaN, which must stop
training (NonFiniteLossError) on every worker at the same step. The weights after epoch 1 go to
--out; one JSON line ("RESULT {...}") says what happened. Before training, a worker other than
the chief adds 1 to every weight and proposes start epoch 7: `sync_from_chief` and `from_chief`
must give it the chief's weights and epoch, as after a restore. Adam keeps a moving average of
the weights (ema_momentum, as `--ema-momentum` sets it): after epoch 1 the result gives the
averages' digest and whether they equal the weights (Keras' average starts at the first step's
weights).
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

BATCH, VALID = 100, 60


def run(mnist_cache: str, weights: str, out: str) -> dict:
    from models import trainer  # loads TensorFlow, which runs no op before the strategy

    cluster = trainer.tf_config()
    strategy = trainer.make_strategy(cluster)
    chief = trainer.is_chief(cluster)
    import keras
    import numpy as np
    import tensorflow as tf

    from data import mnist
    from models import features
    from models.capsnet import schedule
    from models.capsnet.recipe import Recipe

    images = mnist.load(cache_dir=mnist_cache, allow_network=False)[0]
    image_xf = features.transformed_name(features.IMAGE_KEY)

    def examples(rows):  # what Transform writes: pixels / 255, labels
        return tf.data.Dataset.from_tensor_slices({
            image_xf: images.x_train[rows, :, :, None].astype("float32") / 255.0,
            features.transformed_name(features.LABEL_KEY):
                images.y_train[rows, None].astype("int64")})

    def epoch_batches(epoch):
        train = examples(slice(0, BATCH))
        if epoch == 1:
            train = train.map(lambda x: {**x, image_xf: x[image_xf] * np.nan})
        return trainer.train_batches(train, BATCH, 1, config.max_shift, config.seed, epoch)

    # float32: the workers' weights are compared with a single worker's.
    config = Recipe(epochs=2, batch_size=BATCH, mixed_precision="none", seed=5, ema_momentum=0.5)
    _, model, _ = trainer.build_models(config, 1, strategy)
    model.load_weights(weights)
    if not chief:
        for weight in model.weights:
            weight.assign(weight + 1.0)
    trainer.sync_from_chief(strategy, model.weights + model.optimizer.variables)
    start = int(trainer.from_chief(strategy, [tf.constant(0 if chief else 7)])[0])

    result = {"replicas": strategy.num_replicas_in_sync, "chief": chief, "start": start,
              "strategy": type(strategy).__name__, "batch_logs": [], "error": None}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            result["batch_logs"].append(logs)

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                result["logs"] = logs
                weights = model.get_weights()
                np.savez(out, *weights)
                with schedule.averaged_weights(model) as averaged:
                    result["ema"] = {"averaged": averaged,
                                     "digest": trainer.weights_digest(model),
                                     "equal_to_the_weights": all(
                                         np.array_equal(a, w)
                                         for a, w in zip(model.get_weights(), weights))}

    try:
        trainer.train(strategy, model, epoch_batches,
                      trainer.valid_batches(examples(slice(BATCH, BATCH + VALID)), BATCH),
                      epochs=2, initial_epoch=start, steps_per_epoch=1,
                      callbacks=[trainer.StopOnNonFiniteLoss(), Record()])
    except trainer.NonFiniteLossError as e:
        result["error"] = str(e)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mnist-cache", required=True)
    p.add_argument("--weights", required=True, help="initial weights to load")
    p.add_argument("--out", required=True, help="the weights after epoch 1 (.npz)")
    args = p.parse_args()
    print("RESULT " + json.dumps(run(args.mnist_cache, args.weights, args.out)), flush=True)


if __name__ == "__main__":
    main()
