# The image every step of the compiled pipeline runs in (kubeflow_runner.py --image IMAGE).
# Build it from the repository root, from the checkout you compile the pipeline from:
#   docker build -t gcr.io/PROJECT/capsnet-tfx:$(git rev-parse --short HEAD) .
# The project's code is baked in and found by name on PYTHONPATH (models.trainer.run_fn, ...);
# nothing is installed at run time. See README, "Run on Kubeflow".

# Beam's SDK worker files (/opt/apache/beam, the `boot` entrypoint) for the apache-beam version of
# requirements.lock, so that this image can also be Dataflow's --sdk_container_image.
# Keep BEAM_VERSION equal to the lock's apache-beam (tests/kubeflow/test_dockerfile.py checks).
ARG BEAM_VERSION=2.74.0
FROM apache/beam_python3.10_sdk:${BEAM_VERSION} AS beam-sdk

FROM tensorflow/tfx:1.16.0

# The lock was resolved for Python 3.10: stop here if the base image has another Python.
RUN python -c "import sys; assert sys.version_info[:2] == (3, 10), sys.version"

WORKDIR /pipeline

# Runtime dependencies: requirements.in above its '# dev:' line (no test, notebook or JAX
# packages), at exactly the versions of requirements.lock. The base image already holds TFX 1.16
# and most of its dependencies; pip replaces only those whose version differs from the lock.
COPY requirements.in requirements.lock ./
RUN sed '/^# dev:/,$d' requirements.in > /tmp/runtime.in \
 && python -m pip install --no-cache-dir -r /tmp/runtime.in -c requirements.lock \
 && rm /tmp/runtime.in

# Optional extras, e.g. s3:// support for TensorFlow 2.16:
#   docker build --build-arg EXTRA_PACKAGES="tensorflow-io==0.37.1 boto3" ...
ARG EXTRA_PACKAGES=""
RUN if [ -n "$EXTRA_PACKAGES" ]; then python -m pip install --no-cache-dir $EXTRA_PACKAGES; fi

COPY --from=beam-sdk /opt/apache/beam /opt/apache/beam

# The project: every package the compiled steps name (executors, run_fn, preprocessing_fn) or
# import, and the schema file (pipeline/schema.pbtxt, compiled as /pipeline/pipeline/...).
COPY components/ components/
COPY data/ data/
COPY models/ models/
COPY pipeline/ pipeline/

# TensorFlow's CPU runtime is chosen from each node's CPU when Python starts, before any step
# loads TensorFlow: sitecustomize.py on PYTHONPATH calls models.capsnet.hardware.apply_tf_env,
# as local_runner.py does (oneDNN where the CPU has native bf16, TF's own kernels elsewhere).
COPY docker/sitecustomize.py sitecustomize.py

# Keras 3 on TensorFlow is what the exported SavedModel needs (the JAX backend is for dev only).
ENV PYTHONPATH=/pipeline \
    KERAS_BACKEND=tensorflow
