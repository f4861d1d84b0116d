"""The Beam runner of local runs is named, so no run tries Beam's Prism download.

Beam >= 2.68's default DirectRunner first downloads the Prism runner (a Go binary) from GitHub
into ~/.apache_beam/cache/prism/ and falls back to the in-process runner only when that fails:
offline it leaves an empty cache dir behind; online it would run another runner than the tests.
"""

import os
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import local_runner
from pipeline import configs
from pipeline.pipeline import local_beam_args
from tests.conftest import REPO


@pytest.mark.parametrize("workers, mode", [(1, "in_memory"), (2, "multi_processing"),
                                           (3, "multi_processing")])
def test_every_worker_count_runs_on_the_named_fn_api_runner(workers, mode):
    args = local_beam_args(workers)
    # What a TFX Beam executor builds from its beam_pipeline_args (BaseBeamExecutor).
    pipeline = beam.Pipeline(argv=args)
    assert type(pipeline.runner) is FnApiRunner
    direct = PipelineOptions(args).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == (mode, workers)
    assert local_beam_args(1) == list(configs.LOCAL_BEAM_ARGS)


def test_zero_workers_is_refused(capsys):
    with pytest.raises(ValueError, match="Beam workers must be >= 1, got 0"):
        local_beam_args(0)
    assert local_runner.parse_args([])[0].beam_workers == 1
    with pytest.raises(SystemExit) as e:
        local_runner.parse_args(["--beam-workers", "0"])
    assert e.value.code == 2
    assert "--beam-workers must be >= 1, got 0" in capsys.readouterr().err


PIPELINE = """
import logging, sys
import apache_beam as beam
from pipeline import configs
logging.basicConfig(level=logging.INFO)  # Beam says at INFO when it tries Prism
with beam.Pipeline(argv=list(configs.LOCAL_BEAM_ARGS)) as p:
    _ = (p | beam.Create(range(100)) | beam.Map(lambda x: x % 7)
         | beam.combiners.Count.PerElement() | beam.combiners.ToList()
         | beam.Map(lambda counts: print(sorted(counts))))
print(type(p.runner).__name__)
"""


def test_a_pipeline_on_the_local_args_leaves_no_runner_download_behind(tmp_path):
    """A real pipeline with a GroupByKey, in a fresh process whose HOME is a temp dir."""
    proc = subprocess.run([sys.executable, "-c", PIPELINE], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = sorted((k, 100 // 7 + (k < 100 % 7)) for k in range(7))
    assert proc.stdout.splitlines() == [str(counts), "FnApiRunner"]
    assert "prism" not in proc.stderr.lower()
    assert not (tmp_path / ".apache_beam").exists()
