"""Pusher executor: a blessed model lands in the serving dir once, whole, under a new version.

TFX's stock filesystem Pusher copies straight into `<serving dir>/<unix time>/` (saved_model.pb
last), so a reader listing the serving dir can meet a half-copied version. This executor copies
into a hidden temp dir beside it and renames that into place: on a local or mounted filesystem
the rename is atomic, so a version dir either does not exist or is complete.

It also pushes each model artifact at most once: every version records the model it came from in
`assets.extra/push_info.json` (TF Serving ignores assets.extra), and a model already present is
reported as pushed there instead of being copied again, e.g. when a re-run re-blesses it against
itself as the latest blessed baseline.
"""

import json
import os
import time
import uuid
from typing import Any, Dict, List, Optional

from absl import logging
from tfx import types
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, proto_utils

PUSH_INFO = os.path.join("assets.extra", "push_info.json")
_TMP_PREFIX = ".tmp-"


def existing_version(serving_dir: str, model_uri: str) -> Optional[str]:
    """The version dir name under serving_dir that already holds the model from model_uri."""
    if not fileio.isdir(serving_dir):
        return None
    for version in sorted(fileio.listdir(serving_dir)):
        info = os.path.join(serving_dir, version, PUSH_INFO)
        if not version.startswith(_TMP_PREFIX) and fileio.exists(info):
            with fileio.open(info) as f:
                if json.load(f).get("model_uri") == model_uri:
                    return version.rstrip("/")
    return None


def next_version(serving_dir: str, now: float) -> str:
    """A unix-time version number greater than every existing version."""
    versions = [int(v.rstrip("/")) for v in fileio.listdir(serving_dir) if v.rstrip("/").isdigit()] \
        if fileio.isdir(serving_dir) else []
    return str(max([int(now)] + [v + 1 for v in versions]))


def push_atomically(model_path: str, model_uri: str, serving_dir: str) -> str:
    """Copies model_path to serving_dir/<new version>/ via a temp dir + rename; returns the dir."""
    fileio.makedirs(serving_dir)
    version = next_version(serving_dir, time.time())
    tmp = os.path.join(serving_dir, f"{_TMP_PREFIX}{version}-{uuid.uuid4().hex}")
    try:
        io_utils.copy_dir(model_path, tmp)
        fileio.makedirs(os.path.dirname(os.path.join(tmp, PUSH_INFO)))
        with fileio.open(os.path.join(tmp, PUSH_INFO), "w") as f:
            json.dump({"model_uri": model_uri, "version": version,
                       "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
        destination = os.path.join(serving_dir, version)
        fileio.rename(tmp, destination)
    except BaseException:
        if fileio.exists(tmp):
            fileio.rmtree(tmp)
        raise
    return destination


class Executor(pusher_executor.Executor):
    """Filesystem-only Pusher with atomic versions and at-most-once pushes per model."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        self._log_startup(input_dict, output_dict, exec_properties)
        model_push = artifact_utils.get_single_instance(
            output_dict[standard_component_specs.PUSHED_MODEL_KEY])
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(model_push)
            return
        destination_config = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(
            exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination_config)
        if destination_config.WhichOneof("destination") != "filesystem":
            raise NotImplementedError("this Pusher pushes to a filesystem destination only")
        serving_dir = destination_config.filesystem.base_directory
        model_uri = artifact_utils.get_single_instance(
            input_dict[standard_component_specs.MODEL_KEY]).uri
        model_path = self.GetModelPath(input_dict)

        version = existing_version(serving_dir, model_uri)
        if version is not None:
            destination = os.path.join(serving_dir, version)
            logging.info("Model %s is already served as %s; not pushing it again.",
                         model_uri, destination)
        else:
            destination = push_atomically(model_path, model_uri, serving_dir)
            version = os.path.basename(destination)
            logging.info("Model pushed to %s.", destination)
        io_utils.copy_dir(model_path, model_push.uri)  # the Pusher's own archive copy
        self._MarkPushed(model_push, pushed_destination=destination, pushed_version=version)
