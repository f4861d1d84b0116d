"""Benchmarks: scripts that print numbers (one JSON line each), never timed assertions in tests.

  python -m bench.train_throughput --mode train   the Trainer's training step (model, losses,
                                                  optimizer, input pipeline), images/s
  python -m bench.train_throughput --mode input   the Trainer's input pipeline alone
  python -m bench.train_throughput --mode serve   the exported `serving_images` signature
  python -m bench.sitting                         those runs and the seed's, alternately in rounds:
                                                  the medians as a markdown table

Figures and the commands that produced them: docs/results.md.
"""
