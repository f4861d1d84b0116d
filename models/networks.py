"""The networks a Trainer trains, behind one interface: the CapsNet (the product, models/capsnet)
and the paper's baseline CNN (the robustness comparison, models/cnn).

The input pipeline, the training loop, resume, the serving export and the standalone trainer are
written once against `Network`; the recipe's `network` field picks one. Both models take the
image as an input named "image" and name their first layer "conv1", whose dtype policy is the
model's.
"""

import dataclasses
from typing import Callable, Optional

import keras

from models import features
from models.capsnet import model as capsnet
from models.capsnet.recipe import Recipe
from models.cnn import model as cnn


@dataclasses.dataclass(frozen=True)
class Network:
    """What the shared training and export code needs to know of one network.

    build(recipe, dtype_policy) -> (train_model, inference_model), sharing every weight
    compile(train_model, recipe, optimizer): its losses and metrics, with `optimizer`
    model_io(images [B,28,28,1] float32, onehot [B,10]) -> (inputs, targets) of train_model;
      keras.ops only, so tf.data (the Trainer) and numpy (the standalone trainer) both use it
    scores: the inference model's output of class scores [B,10] (the serving `scores`)
    keras_file: where a serving export keeps the whole Keras inference model (relative to the
      SavedModel dir)
    """
    name: str
    build: Callable
    compile: Callable
    model_io: Callable
    scores: str
    keras_file: str


def _capsnet_io(images, onehot):
    flat = keras.ops.reshape(images, (-1, features.NUM_PIXELS))
    return ({capsnet.IMAGE: images, capsnet.LABEL: onehot},
            {capsnet.LENGTHS: onehot, capsnet.RECON: flat})  # the decoder redraws its input


CAPSNET = Network(
    name="capsnet",
    build=lambda recipe, policy: capsnet.build_capsnet(routings=recipe.routings,
                                                       dtype_policy=policy),
    compile=lambda model, recipe, optimizer: capsnet.compile_capsnet(
        model, optimizer=optimizer, recon_weight=recipe.recon_weight),
    model_io=_capsnet_io,
    scores=capsnet.LENGTHS,
    keras_file=capsnet.KERAS_MODEL_FILE)

CNN = Network(
    name="cnn",
    build=lambda recipe, policy: cnn.build_cnn(dtype_policy=policy),
    compile=lambda model, recipe, optimizer: cnn.compile_cnn(model, optimizer=optimizer),
    model_io=lambda images, onehot: (images, {cnn.PROBABILITIES: onehot}),
    scores=cnn.PROBABILITIES,
    keras_file=cnn.KERAS_MODEL_FILE)

NETWORKS = {network.name: network for network in (CAPSNET, CNN)}
FIRST_LAYER = capsnet.CONV1  # == cnn.CONV1: its dtype policy is the model's


def get(name: str) -> Network:
    """The network named `name`; a ValueError naming the networks that exist otherwise."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {sorted(NETWORKS)}")
    return NETWORKS[name]


def of_model(model: keras.Model) -> Network:
    """The network `model` is an inference model of (by its name: "capsnet", "cnn")."""
    if model.name not in NETWORKS:
        raise ValueError(f"{model.name!r} is not the inference model of a known network; "
                         f"expected a model named one of {sorted(NETWORKS)}")
    return NETWORKS[model.name]


def policy_of(model: keras.Model) -> Optional[str]:
    """The model's mixed dtype policy name ("mixed_bfloat16", ...), or None when it is float32."""
    name = model.get_layer(FIRST_LAYER).dtype_policy.name
    return None if name == "float32" else name


def with_dtype_policy(network: Network, recipe: Recipe, inference_model: keras.Model,
                      dtype_policy: Optional[str] = None) -> keras.Model:
    """`inference_model` itself where it has `dtype_policy` and no optimizer, else the same
    network built with `dtype_policy`, uncompiled, carrying its weights: what an export saves
    (the CNN's inference model is its compiled training model, whose optimizer state would
    triple the saved file).

    The weights are the float32 master weights under every policy, so a bfloat16-trained model
    yields a float32 serving model (and the reverse) without loss.
    """
    if policy_of(inference_model) == dtype_policy and not getattr(inference_model, "optimizer",
                                                                   None):
        return inference_model
    _, model = network.build(recipe, dtype_policy)
    model.set_weights(inference_model.get_weights())
    return model
