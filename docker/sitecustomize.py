"""Imported by Python at every interpreter start in the pipeline image (it lies on PYTHONPATH):
chooses TensorFlow's CPU runtime from the node's CPU before any step loads TensorFlow, as
local_runner.py does (models/capsnet/hardware.py). Kubeflow runs each step's own command, so no
entrypoint of ours runs first. The pod's environment wins."""

from models.capsnet import hardware

hardware.apply_tf_env()
