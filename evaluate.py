"""Evaluate a finished or interrupted run without retraining.

    python evaluate.py RUN_DIR [--eval-metrics all] [--step N] [--data-dir DIR] [--no-cuda]

Loads the run's checkpoint with its stored config, encodes the whole dSprites grid once,
draws the ground-truth plot for the checkpoint's step (unless the run already has it), measures
recon, KL, ELBO and i_max over the fixed evaluation sample, and appends all of it, with the
protocols and library versions, to RUN_DIR/metrics.json. The metrics are the run's own
(``--eval-metrics`` of its config, factor_vae,mig by default); ``--eval-metrics all`` for all
five (DCI alone takes minutes). ``--step N`` scores the checkpoint the run kept at step N
(``run.py --keep-interval``) instead of its latest. A run that is still training is scored at its latest checkpoint,
with a warning naming its step, and nothing is written into its folder.
"""
import argparse
import dataclasses
import logging
import signal
import sys
import threading

from dataset import DatasetError
from metrics import METRIC_NAMES, metric_list
from representation import Trained, evaluation_report, log_measures
from runfolder import RunFolder, stored_model
from utils import ArgumentParser, ConfigError, DiskFull, OutOfMemory

log = logging.getLogger("evaluate")


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help=f"a run folder with {RunFolder.CHECKPOINT} (or "
                                        f"{RunFolder.CONFIG} and {RunFolder.WEIGHTS})")
    p.add_argument("--eval-metrics", type=metric_list, default=None,
                   help=f"comma-separated from {', '.join(METRIC_NAMES)}; all; none (only the "
                        f"evaluation sample's measures). Default: the run's own --eval-metrics")
    p.add_argument("--step", type=int, default=None,
                   help="score the checkpoint kept at this step (checkpoints/step_N.pt, written "
                        "with run.py --keep-interval) instead of the latest")
    p.add_argument("--data-dir", help="where the official dSprites npz is (default: the run's)")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="evaluate on the CPU")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    folder = RunFolder(args.run_dir)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _evaluate(args, folder)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing more was written to {folder} (its metrics.json "
              f"keeps the evaluations it had)", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _evaluate(args, folder):
    try:
        checkpoint, stored = stored_model(folder, args.step)
        if stored.dataset != "dsprites":
            raise ConfigError(f"{folder} was trained on {stored.dataset}, which has no "
                              f"ground-truth factors to score against")
        holder = folder.lock_holder()
        if holder is None:  # before the encoding pass, not after it
            folder.check_writable("evaluate.py (metrics.json, the ground-truth plot)")
            folder.remove_orphans()  # what an interrupted write left; no run writes here now
        if holder is not None:
            log.warning("warning: %s is still training (PID %s): scoring its %s checkpoint, "
                        "step %d of %d, and writing nothing into the run folder (the run "
                        "writes its own evaluations)", folder, holder,
                        "latest" if args.step is None else "kept", checkpoint["step"],
                        stored.steps)
        names = stored.eval_metrics if args.eval_metrics is None else args.eval_metrics
        trained = Trained.build(dataclasses.replace(
            stored, viz_on=False, cuda=args.cuda and stored.cuda,
            data_dir=args.data_dir or stored.data_dir), checkpoint)
        results = trained.evaluate(folder, tuple(n for n in names.split(",") if n),
                                   plot=holder is None)
        measures = trained.measures()
        log_measures(trained.step, measures)
        if holder is None:
            folder.append_evaluation(evaluation_report(trained.step, trained.data, results,
                                                       "evaluate.py", measures))
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutOfMemory as err:
        print(f"error: {err}; nothing was written", file=sys.stderr)
        return 3
    except DiskFull as err:
        print(f"error: no space left on device while writing {err.path or 'a file'}; the "
              f"previous version of the file is kept. Free some space, then run evaluate.py "
              f"again", file=sys.stderr)
        return 3
    where = (f" -> {folder.path / folder.REPORT}" if holder is None
             else " (not written: the run is in training)")
    print(f"step {trained.step}: " + ", ".join(
        [f"{n} {r['score']:.4f}" for n, r in results.items()]
        + [f"{n} {measures[n]:.4g}" for n in ("recon", "kl", "elbo", "i_max")]) + where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
