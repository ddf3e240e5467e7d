"""Evaluate a finished or interrupted run without retraining.

    python evaluate.py RUN_DIR [--eval-metrics all] [--data-dir DIR] [--no-cuda]

Loads the run's checkpoint with its stored config, encodes the whole dSprites grid once,
draws the ground-truth plot for the checkpoint's step (unless the run already has it) and
appends the scores, with their protocols and library versions, to RUN_DIR/metrics.json.
"""
import argparse
import dataclasses
import logging
import sys

from dataset import DatasetError
from metrics import METRIC_NAMES, metric_list
from solver import Trained, evaluation_report, stored_run
from utils import ConfigError, DiskFull, RunFolder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder with checkpoints/last.pt")
    p.add_argument("--eval-metrics", type=metric_list, default=",".join(METRIC_NAMES),
                   help=f"comma-separated from {', '.join(METRIC_NAMES)}; or all (default)")
    p.add_argument("--data-dir", help="where the official dSprites npz is (default: the run's)")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="evaluate on the CPU")
    args = p.parse_args(argv)
    if not args.eval_metrics:
        p.error("--eval-metrics none leaves nothing to evaluate; name the metrics, or all")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    folder = RunFolder(args.run_dir)
    try:
        checkpoint, stored = stored_run(folder)
        if stored.dataset != "dsprites":
            raise ConfigError(f"{folder} was trained on {stored.dataset}, which has no "
                              f"ground-truth factors to score against")
        trained = Trained.build(dataclasses.replace(
            stored, viz_on=False, cuda=args.cuda and stored.cuda,
            data_dir=args.data_dir or stored.data_dir), checkpoint)
        results = trained.evaluate(folder, tuple(args.eval_metrics.split(",")))
        folder.append_evaluation(evaluation_report(trained.step, trained.data, results,
                                                   source="evaluate.py"))
    except (ConfigError, DatasetError, DiskFull) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"step {trained.step}: " + ", ".join(f"{n} {r['score']:.4f}" for n, r in results.items())
          + f" -> {folder.path / folder.REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
