"""Reading a pipeline's runs back from ML Metadata, the TFMA output and the Trainer's TensorBoard
events, for the end-of-run summary (pipeline/summary.py) and the notebooks
(notebooks/analysis.py): the one reader behind both.

TFX records every node's execution in the run's `pipeline_run` context, cached ones included
(with the outputs they reused), so readers follow the metadata instead of guessing paths.
"""

import dataclasses
import os
from typing import Dict, Iterable, Iterator, Optional, Tuple

from ml_metadata.proto import metadata_store_pb2

_DONE = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
_INPUTS = (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT)
_OUTPUTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)


@dataclasses.dataclass
class ComponentRun:
    """One execution of a component, with its input and output artifacts by key."""
    execution: metadata_store_pb2.Execution
    inputs: Dict[str, list]    # key -> [metadata_store_pb2.Artifact]
    outputs: Dict[str, list]

    @property
    def cached(self) -> bool:
        return self.execution.last_known_state == metadata_store_pb2.Execution.CACHED

    def output(self, key: str) -> metadata_store_pb2.Artifact:
        return self.outputs[key][0]

    def input(self, key: str) -> metadata_store_pb2.Artifact:
        return self.inputs[key][0]


def component_run(store, execution, events: Iterable = None) -> ComponentRun:
    """`execution` with its artifacts, grouped by input/output key in their recorded order."""
    events = list(store.get_events_by_execution_ids([execution.id]) if events is None
                  else events)
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    run = ComponentRun(execution, {}, {})
    for event in sorted(events, key=lambda e: (e.path.steps[0].key, e.path.steps[-1].index)):
        side = run.inputs if event.type in _INPUTS else run.outputs if event.type in _OUTPUTS \
            else None
        if side is not None:
            side.setdefault(event.path.steps[0].key, []).append(artifacts[event.artifact_id])
    return run


def latest_run(store, pipeline_name: str) -> Dict[str, ComponentRun]:
    """{node id: ComponentRun} for the pipeline's most recent run."""
    pipeline = store.get_context_by_type_and_name("pipeline", pipeline_name)
    if pipeline is None:
        raise LookupError(f"pipeline {pipeline_name!r} has no runs in this metadata store")
    run = max((c for c in store.get_children_contexts_by_context(pipeline.id)
               if c.type == "pipeline_run"), key=lambda c: c.id)
    executions = sorted(store.get_executions_by_context(run.id), key=lambda e: e.id)
    events = store.get_events_by_execution_ids([e.id for e in executions])
    return {_node_id(store, execution): component_run(
                store, execution, [e for e in events if e.execution_id == execution.id])
            for execution in executions}


def _node_id(store, execution) -> str:
    for context in store.get_contexts_by_execution(execution.id):
        if context.type == "node":
            return context.name.split(".", 1)[1]
    raise LookupError(f"execution {execution.id} belongs to no node")


def latest_execution(store, pipeline_root: str, component: str,
                     node_id: Optional[str] = None) -> ComponentRun:
    """The newest successful or cached execution of `component` (its class name, e.g.
    'Evaluator') as the pipeline node `node_id` (default: the class name; the robustness
    evaluation's Evaluator is the node 'RobustnessEvaluator') whose outputs lie under
    pipeline_root, in whichever run it happened."""
    types = [t.name for t in store.get_execution_types() if t.name.split(".")[-1] == component]
    executions = sorted((e for t in types for e in store.get_executions_by_type(t)
                         if e.last_known_state in _DONE), key=lambda e: e.id, reverse=True)
    for execution in executions:
        if _node_id(store, execution) != (node_id or component):
            continue
        run = component_run(store, execution)
        uris = [a.uri for artifacts in run.outputs.values() for a in artifacts]
        if uris and all(_under(uri, pipeline_root) for uri in uris):
            return run
    raise LookupError(f"no finished {component} execution wrote under {pipeline_root}")


def producer(store, artifact) -> ComponentRun:
    """The execution that first wrote `artifact` (e.g. the Trainer run of a model)."""
    events = [e for e in store.get_events_by_artifact_ids([artifact.id])
              if e.type == metadata_store_pb2.Event.OUTPUT]
    execution = store.get_executions_by_id([min(e.execution_id for e in events)])[0]
    return component_run(store, execution)


def _under(uri: str, root: str) -> bool:
    root = root.rstrip("/")
    if "://" not in root:
        root, uri = os.path.abspath(root), os.path.abspath(uri) if "://" not in uri else uri
    return uri == root or uri.startswith(root + "/")


def slice_metrics(evaluation_uri: str) -> Dict[tuple, Dict[str, float]]:
    """{slice key as ((column, value), ...): {metric: value}} of the candidate model in a TFMA
    output; the overall slice's key is ()."""
    import tensorflow_model_analysis as tfma

    by_slice = {}
    for metrics in tfma.load_metrics(evaluation_uri):
        key = tuple((k.column, k.int64_value) for k in metrics.slice_key.single_slice_keys)
        by_slice[key] = {kv.key.name: kv.value.double_value.value
                         for kv in metrics.metric_keys_and_values
                         if kv.key.model_name in ("", "candidate") and not kv.key.is_diff}
    return by_slice


def epoch_events(model_run_uri: str, run: str = "train") -> Iterator[Tuple[str, int, float, float]]:
    """(tag, 0-based epoch, wall time in s, value) of every per-epoch scalar ('epoch_loss',
    'epoch_learning_rate', ...) in a Trainer's TensorBoard events (<model_run>/<run>/, run
    'train' or 'validation'); the wall time is when Keras wrote it, at the end of the epoch and
    its validation pass. Read with TensorFlow's event protos: no TensorBoard server needed."""
    import tensorflow as tf

    pattern = f"{model_run_uri.rstrip('/')}/{run}/events.out.tfevents.*"
    for path in sorted(tf.io.gfile.glob(pattern)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith("epoch_") and value.HasField("tensor"):
                    yield (value.tag, event.step, event.wall_time,
                           float(tf.make_ndarray(value.tensor)))


def epoch_scalars(model_run_uri: str, tag: str) -> Dict[int, Tuple[float, float]]:
    """{0-based epoch: (wall time in s, value)} of one scalar of epoch_events' train run."""
    return {epoch: (wall, value) for name, epoch, wall, value in epoch_events(model_run_uri)
            if name == tag}
