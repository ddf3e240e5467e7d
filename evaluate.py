"""Evaluate a finished or interrupted run without retraining.

    python evaluate.py RUN_DIR [--eval-metrics all] [--data-dir DIR] [--no-cuda]

Loads the run's checkpoint with its stored config, encodes the whole dSprites grid once,
draws the ground-truth plot for the checkpoint's step (unless the run already has it) and
appends the scores, with their protocols and library versions, to RUN_DIR/metrics.json.
"""
import argparse
import logging
import sys

from dataset import DatasetError
from metrics import METRIC_NAMES
from run import ConfigError, load_checkpoint, metric_list, stored_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder with checkpoints/last.pt")
    p.add_argument("--eval-metrics", type=metric_list, default=",".join(METRIC_NAMES),
                   help=f"comma-separated from {', '.join(METRIC_NAMES)}; or all (default)")
    p.add_argument("--data-dir", help="where the official dSprites npz is (default: the run's)")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="evaluate on the CPU")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    from solver import Solver

    try:
        checkpoint = load_checkpoint(args.run_dir)
        stored = checkpoint["config"]
        if stored["dataset"] != "dsprites":
            raise ConfigError(f"{args.run_dir} was trained on {stored['dataset']}, which has no "
                              f"ground-truth factors to score against")
        config = stored_config(checkpoint, cuda=args.cuda and stored["cuda"],
                               data_dir=args.data_dir or stored["data_dir"])
        solver = Solver(config, args.run_dir, checkpoint)
        results = solver.evaluate_representation(tuple(args.eval_metrics.split(",")))
        solver.record_evaluation(results, source="evaluate.py")
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"step {solver.step}: " + ", ".join(f"{n} {r['score']:.4f}" for n, r in results.items())
          + f" -> {solver.run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
