"""The baseline CNN of Sabour, Frosst & Hinton (2017), section 5.1, in Keras 3.

The network the CapsNet is compared with on affine-transformed digits (pipeline/robustness.py).
Like models/capsnet it uses `keras` only, so it runs under any Keras backend; it shares the
input pipeline, the training loop, resume and the export with the CapsNet through
`models.networks`.

Modules:
  model  build_cnn -> (train_model, inference_model), compile_cnn
"""
