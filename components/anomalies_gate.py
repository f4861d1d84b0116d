"""AnomaliesGate: stops the run before Transform and training when ExampleValidator found anomalies.

ExampleValidator only records anomalies; by itself nothing downstream waits for it. The pipeline
makes Transform depend on this gate, so data that breaks the schema never reaches training.
"""

import os

from tensorflow_data_validation.utils import anomalies_util
from tfx import v1 as tfx
from tfx.types import artifact_utils


def describe_anomalies(anomalies) -> str:
    """'' when no split of an ExampleAnomalies artifact has anomalies, else one line per anomaly."""
    lines = []
    for split in artifact_utils.decode_split_names(anomalies.split_names):
        path = os.path.join(artifact_utils.get_split_uri([anomalies], split), "SchemaDiff.pb")
        report = anomalies_util.load_anomalies_binary(path)
        for feature, info in report.anomaly_info.items():
            lines.append(f"split '{split}', feature '{feature}': {info.description}")
        if report.HasField("dataset_anomaly_info"):
            lines.append(f"split '{split}', dataset: {report.dataset_anomaly_info.description}")
    return "\n".join(lines)


@tfx.dsl.components.component
def AnomaliesGate(anomalies: tfx.dsl.components.InputArtifact[
        tfx.types.standard_artifacts.ExampleAnomalies]):
    """Fails the run if ExampleValidator reported any anomaly in any split."""
    report = describe_anomalies(anomalies)
    if report:
        raise ValueError(
            "ExampleValidator found data anomalies; the run stops before training:\n" + report)
