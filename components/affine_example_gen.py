"""AffineExampleGen: the robustness split, affine-transformed copies of the test digits.

Reads the `test` split of MnistExampleGen's examples (never train or valid) and writes one split,
`affine`: every test image under every transform of an `data.affine.AffineSpec` (the identity,
translations, rotations, scalings, shears and a random affine mix), as tf.Examples

  image      784 raw uint8 bytes, the transformed digit
  label      int64, the digit (unchanged)
  transform  bytes, the family: identity, translate, rotate, scale, shear or affine
  magnitude  int64, in the family's unit (data/affine.py)

so that TFMA slices by `transform` and by `transform` x `magnitude`. The transforms run in a
Beam pipeline (one element per test image), so they scale out with the other Beam components.
Each example's transform is drawn from a seed of its own (data/affine.py): the same bytes come
out on every run and machine, whatever the order of the elements. The artifact records how many
transforms needed another candidate to keep the digit in the frame (`resampled`) and how many
examples were left out because none did (`rejected`), in total as custom properties and per
transform in `transform_counts.json` beside the split.
"""

import hashlib
import json
import os
from typing import Any, Dict, List, Tuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from tfx import types
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from data import affine
from models import features

SOURCE_SPLIT = "test"
SPLIT = "affine"
TRANSFORM_KEY = "transform"
MAGNITUDE_KEY = "magnitude"
COUNTS_FILE = "transform_counts.json"


def parse_example(serialized: bytes) -> Tuple[np.ndarray, int]:
    """A raw MNIST tf.Example -> (uint8 [28, 28] image, label)."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    pixels = np.frombuffer(feature[features.IMAGE_KEY].bytes_list.value[0], np.uint8)
    return (pixels.reshape(features.IMAGE_SIZE, features.IMAGE_SIZE),
            int(feature[features.LABEL_KEY].int64_list.value[0]))


def to_example(image: np.ndarray, label: int, family: str, magnitude: int) -> bytes:
    """One transformed digit -> serialized tf.Example (module docstring), byte for byte the
    same on every run: protobuf writes a map (the features) in any order unless asked not to."""
    return tf.train.Example(features=tf.train.Features(feature={
        features.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[image.tobytes()])),
        features.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        TRANSFORM_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[family.encode()])),
        MAGNITUDE_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[magnitude])),
    })).SerializeToString(deterministic=True)  # the features in key order: the same bytes


class _Transform(beam.DoFn):
    """A serialized test example -> ('example', serialized transformed examples) and
    ('count', (family, magnitude, kept, resampled, rejected)) per transform."""

    def __init__(self, spec_json: str):
        self._spec = affine.AffineSpec.from_json_dict(json.loads(spec_json))

    def process(self, serialized: bytes):
        image, label = parse_example(serialized)
        for family, magnitude, outcome in affine.transform_all(image, label, self._spec):
            if outcome.image is not None:
                yield beam.pvalue.TaggedOutput(
                    "examples", to_example(outcome.image, label, family, magnitude))
            yield beam.pvalue.TaggedOutput("counts", (
                f"{family}:{magnitude}",
                np.array([outcome.image is not None, outcome.resampled, outcome.image is None],
                         np.int64)))


def _sample_key(serialized: bytes) -> bytes:
    """The order in which `AffineSpec.images` picks test images: by SHA-256 of the example."""
    return hashlib.sha256(serialized).digest()


def read_counts(examples_uri: str) -> Dict[str, Dict[str, int]]:
    """{'<family>:<magnitude>': {'kept', 'resampled', 'rejected'}} of an AffineExampleGen
    output (its artifact uri)."""
    with tf.io.gfile.GFile(os.path.join(examples_uri, COUNTS_FILE)) as f:
        return json.load(f)


class Executor(base_beam_executor.BaseBeamExecutor):
    """Reads the test split, writes the `affine` split and the transform counts."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]], exec_properties: Dict[str, Any]):
        spec_json = exec_properties["spec"]
        spec = affine.AffineSpec.from_json_dict(json.loads(spec_json))  # refuses a bad spec
        source = artifact_utils.get_single_instance(input_dict["examples"])
        output = artifact_utils.get_single_instance(output_dict["affine_examples"])
        output.split_names = artifact_utils.encode_split_names([SPLIT])
        examples_utils.set_payload_format(
            output, examples_utils.get_payload_format(source))
        pattern = os.path.join(artifact_utils.get_split_uri([source], SOURCE_SPLIT), "*")
        split_dir = artifact_utils.get_split_uri([output], SPLIT)
        counts_path = os.path.join(output.uri, COUNTS_FILE)

        with self._make_beam_pipeline() as pipeline:
            tests = pipeline | "ReadTest" >> beam.io.ReadFromTFRecord(
                pattern, coder=beam.coders.BytesCoder())
            if spec.images is not None:
                tests = (tests
                         | "Sample" >> beam.combiners.Top.Of(spec.images, key=_sample_key,
                                                             reverse=True)
                         | "Unpack" >> beam.FlatMap(lambda chosen: chosen))
            outputs = tests | "Transform" >> beam.ParDo(_Transform(spec_json)).with_outputs(
                "examples", "counts")
            _ = outputs.examples | "Write" >> beam.io.WriteToTFRecord(
                os.path.join(split_dir, "data_tfrecord"), file_name_suffix=".gz",
                coder=beam.coders.BytesCoder())
            _ = (outputs.counts
                 | "Sum" >> beam.CombinePerKey(sum)
                 | "ToDict" >> beam.combiners.ToDict()
                 | "WriteCounts" >> beam.Map(_write_counts, counts_path))

        totals = np.sum([list(c.values()) for c in read_counts(output.uri).values()], axis=0)
        output.set_int_custom_property("kept", int(totals[0]))
        output.set_int_custom_property("resampled", int(totals[1]))
        output.set_int_custom_property("rejected", int(totals[2]))


def _write_counts(counts: Dict[str, np.ndarray], path: str) -> None:
    names = ("kept", "resampled", "rejected")
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump({key: dict(zip(names, map(int, value))) for key, value in
                   sorted(counts.items())}, f, indent=1)


class AffineExampleGenSpec(types.ComponentSpec):
    PARAMETERS = {"spec": ExecutionParameter(type=str)}
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples)}
    OUTPUTS = {"affine_examples": ChannelParameter(type=standard_artifacts.Examples)}


class AffineExampleGen(base_beam_component.BaseBeamComponent):
    """The `affine` split of the test digits under `spec`'s transforms (module docstring)."""

    SPEC_CLASS = AffineExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, examples: types.BaseChannel, spec: affine.AffineSpec):
        """examples: MnistExampleGen's output (its `test` split is read); spec: the
        transforms, checked here, before any work starts."""
        if not isinstance(spec, affine.AffineSpec):
            raise affine.AffineConfigError(
                f"spec must be a data.affine.AffineSpec, got {type(spec).__name__}")
        super().__init__(spec=AffineExampleGenSpec(
            spec=json.dumps(spec.to_json_dict(), sort_keys=True), examples=examples,
            affine_examples=types.Channel(type=standard_artifacts.Examples)))
