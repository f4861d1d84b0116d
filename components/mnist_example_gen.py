"""MnistExampleGen: a FileBasedExampleGen whose executor reads the verified MNIST arrays.

The pipeline starts at the raw source: `input_base` holds the canonical `mnist.npz` written and
verified by `data.mnist`. This executor re-verifies it (the SHA-256 identity hashes) and writes
the three splits of `data.splits` (train, valid, test) as tf.Examples, {'image': 784 raw uint8
bytes, 'label': int64}. Subclassing FileBasedExampleGen keeps TFX's file driver (fingerprints of
`mnist.npz` decide caching) and its Kubeflow V2 compilation.
"""

import os
import tempfile
from typing import Any, Dict, Iterator, List, Tuple

import apache_beam as beam
import tensorflow as tf
from google.protobuf import json_format, struct_pb2
from tfx import v1 as tfx
from tfx.components.example_gen import base_example_gen_executor
from tfx.components.example_gen.component import FileBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2
from tfx.utils import proto_utils

from data import mnist
from data.splits import SPLITS, SplitRange, split_ranges
from models import features

_CHUNK = 2000  # examples per Beam element: enough work per element, small enough to spread


def to_example(image, label) -> bytes:
    """One uint8 [28, 28] image and its label -> serialized tf.Example."""
    return tf.train.Example(features=tf.train.Features(feature={
        features.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        features.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    })).SerializeToString()


def read_verified(npz_uri: str) -> mnist.Mnist:
    """Reads and verifies the canonical npz; remote URIs (gs://, s3://) are copied locally first."""
    if os.path.exists(npz_uri):
        return mnist.read_npz(npz_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, mnist.CANONICAL_FILENAME)
        fileio.copy(npz_uri, local)
        return mnist.read_npz(local)


class _RowsToExamples(beam.DoFn):
    """(source, start, stop) chunks -> serialized tf.Examples, reading the npz once per worker."""

    def __init__(self, npz_uri: str):
        self._npz_uri = npz_uri
        self._data = None

    def setup(self):
        self._data = read_verified(self._npz_uri)

    def process(self, chunk: Tuple[str, int, int]) -> Iterator[bytes]:
        source, start, stop = chunk
        images = getattr(self._data, f"x_{source}")
        labels = getattr(self._data, f"y_{source}")
        for i in range(start, stop):
            yield to_example(images[i], labels[i])


def _chunks(r: SplitRange) -> List[Tuple[str, int, int]]:
    return [(r.source, s, min(s + _CHUNK, r.stop)) for s in range(r.start, r.stop, _CHUNK)]


def _read_custom_config(exec_properties: Dict[str, Any]) -> Dict[str, Any]:
    config = example_gen_pb2.CustomConfig()
    proto_utils.json_to_proto(exec_properties["custom_config"], config)
    struct = struct_pb2.Struct()
    config.custom_config.Unpack(struct)
    return json_format.MessageToDict(struct)


class Executor(base_example_gen_executor.BaseExampleGenExecutor):
    """Writes the train/valid/test splits from the verified canonical npz."""

    def GenerateExamplesByBeam(self, pipeline, exec_properties):
        input_config = example_gen_pb2.Input()
        proto_utils.json_to_proto(exec_properties["input_config"], input_config)
        npz_uri = os.path.join(exec_properties["input_base"], input_config.splits[0].pattern)
        config = _read_custom_config(exec_properties)
        ranges = split_ranges(int(config["valid_size"]), float(config["data_fraction"]))
        return {
            split.name: (pipeline
                         | f"Chunks[{split.name}]" >> beam.Create(_chunks(ranges[split.name]))
                         | f"ToExamples[{split.name}]" >> beam.ParDo(_RowsToExamples(npz_uri)))
            for split in input_config.splits
        }

    def GetInputSourceToExamplePTransform(self):
        raise NotImplementedError("MnistExampleGen builds its splits in GenerateExamplesByBeam")


class MnistExampleGen(FileBasedExampleGen):
    """ExampleGen over the verified MNIST arrays in `input_base/mnist.npz`."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, input_base: str, valid_size: int = 5000, data_fraction: float = 1.0):
        split_ranges(valid_size, data_fraction)  # refuse bad values while the pipeline is built
        struct = struct_pb2.Struct()
        struct.update({"valid_size": valid_size, "data_fraction": data_fraction})
        custom_config = example_gen_pb2.CustomConfig()
        custom_config.custom_config.Pack(struct)
        super().__init__(
            input_base=input_base,
            input_config=tfx.proto.Input(splits=[
                tfx.proto.Input.Split(name=name, pattern=mnist.CANONICAL_FILENAME)
                for name in SPLITS]),
            custom_config=custom_config)
