"""The record of a pipeline run for docs/results.md: its figures as PNGs and its numbers as
Markdown, from ML Metadata, the TFMA output and the Trainer's TensorBoard events (analysis.py's
functions, as the notebooks use them).

    python -m notebooks.run_report --pipeline-root $OUT/pipeline_root \
        --out docs/images/full-run

writes training_curves.png, per_digit.png and confusion_matrix.png under --out and prints the
per-epoch table (across the killed executions a resumed Trainer continued), the first epoch whose
valid error is at most the bar, the Evaluator's test error and count, the blessing and the push.
"""

import argparse
import math
import os
import sys

from notebooks import analysis
from pipeline import summary
from pipeline.evaluation import max_test_errors

FIGURES = ("training_curves.png", "per_digit.png", "confusion_matrix.png")


def epochs_markdown(table, accuracy: str = "val_lengths_accuracy") -> str:
    """The epoch table (analysis.epoch_table) as Markdown: losses, valid accuracy and error,
    seconds."""
    columns = [("loss", "train loss", "{:.4f}"), ("val_loss", "valid loss", "{:.4f}"),
               ("val_lengths_loss", "valid margin loss", "{:.4f}"),
               ("val_recon_loss", "valid recon. loss", "{:.4f}"),
               (accuracy, "valid accuracy", "{:.2%}"), ("seconds", "seconds", "{:.0f}")]
    lines = ["| epoch | " + " | ".join(title for _, title, _ in columns) + " | valid errors |",
             "|---:|" + "---:|" * (len(columns) + 1)]
    for epoch, row in table.iterrows():
        cells = ["" if math.isnan(row[name]) else fmt.format(row[name])
                 for name, _, fmt in columns]
        lines.append(f"| {epoch} | " + " | ".join(cells) + f" | {int(row['val_errors'])} |")
    return "\n".join(lines)


def first_epoch_within(table, max_errors: int):
    """The first epoch with at most max_errors valid errors (counted, not compared as
    float32 accuracies), or None."""
    within = table.index[table["val_errors"] <= max_errors]
    return int(within[0]) if len(within) else None


def report(pipeline_root: str, out_dir: str, metadata_path=None) -> str:
    """Writes FIGURES under out_dir; returns the Markdown record of the latest evaluated run."""
    store = analysis.open_store(pipeline_root, metadata_path)
    evaluator = analysis.latest_execution(store, pipeline_root, "Evaluator")
    trainer = analysis.producer(store, evaluator.input("model"))
    evaluation = evaluator.output("evaluation").uri
    curves = analysis.training_history(store, trainer)
    table = analysis.epoch_table(curves)
    valid = count_examples(analysis.split_dir(trainer.input("examples"), "valid"))
    table["val_errors"] = ((1.0 - table["val_lengths_accuracy"]) * valid).round().astype(int)

    total = analysis.overall(evaluation)
    os.makedirs(out_dir, exist_ok=True)
    figures = [analysis.plot_training_curves(curves),
               analysis.plot_per_digit(analysis.per_digit(evaluation), total["accuracy"]),
               analysis.plot_confusion_matrix(analysis.confusion_matrix(evaluation))]
    for name, figure in zip(FIGURES, figures):
        figure.savefig(os.path.join(out_dir, name))

    bar = analysis.validation_table(evaluation).dropna(subset=["allowed_errors"]).iloc[0]
    bar_rate = bar["allowed_errors"] / total["example_count"]
    blessed = evaluator.output("blessing").custom_properties["blessed"].int_value == 1
    resumed = [str(run.execution.id) for run in analysis.resumed_from(store, trainer)]
    seconds = table["seconds"].dropna()
    return "\n".join([
        f"Trainer execution {trainer.execution.id}"
        + (f", resuming killed execution(s) {', '.join(resumed)}" if resumed else ""),
        f"Epochs: {len(table)}; seconds per epoch: median {seconds.median():.0f} "
        f"(min {seconds.min():.0f}, max {seconds.max():.0f}; {len(seconds)} epochs timed)",
        f"First epoch with valid error <= {bar_rate:.2%}: "
        f"{first_epoch_within(table, max_test_errors(bar_rate, valid))} "
        f"(valid split: {valid} examples)",
        f"Test error (Evaluator): {total['error']:.2%} ({total['errors']} of "
        f"{total['example_count']}; the bar allows {bar['allowed_errors']})",
        f"Model: {'BLESSED' if blessed else 'NOT BLESSED'}",
        *[f"  {line}" for line in summary.threshold_report(evaluation)],
        *[f"Pushed to: {destination}" for destination in pushed_to(store, evaluator)],
        "",
        epochs_markdown(table),
    ])


def count_examples(split_dir: str) -> int:
    """Records in a split of an Examples artifact (gzipped TFRecords)."""
    import tensorflow as tf

    files = tf.io.gfile.glob(os.path.join(split_dir, "*.gz"))
    return sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def pushed_to(store, evaluator) -> list:
    """Where the Pusher executions that read this Evaluator's blessing pushed the model."""
    from ml_metadata.proto import metadata_store_pb2

    readers = {e.execution_id for e in store.get_events_by_artifact_ids(
        [evaluator.output("blessing").id]) if e.type == metadata_store_pb2.Event.INPUT}
    destinations = []
    for execution in store.get_executions_by_id(sorted(readers)):
        run = analysis.mlmd.component_run(store, execution)
        pushed = run.outputs.get("pushed_model", [])
        destinations += [a.custom_properties["pushed_destination"].string_value for a in pushed
                         if a.custom_properties["pushed"].int_value == 1]
    return destinations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline-root", required=True)
    p.add_argument("--metadata-path", help="default: beside the pipeline root")
    p.add_argument("--out", required=True, help="directory for the PNG files (created)")
    args = p.parse_args(argv)
    print(report(args.pipeline_root, args.out, args.metadata_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
