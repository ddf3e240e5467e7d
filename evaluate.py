"""Evaluate a finished or interrupted run without retraining.

    python evaluate.py RUN_DIR [--eval-metrics all] [--step N] [--json FILE] [--out DIR]

Loads the run's checkpoint with its stored config, encodes the whole dSprites grid once,
draws the ground-truth plot for the checkpoint's step (unless the run already has it), measures
recon, KL, ELBO and i_max over the fixed evaluation sample, and appends all of it, with the
protocols and library versions, to RUN_DIR/metrics.json. The metrics are the run's own
(``--eval-metrics`` of its config, factor_vae,mig by default); ``--eval-metrics all`` for all
five (DCI alone takes minutes). ``--step N`` scores the checkpoint the run kept at step N
(``run.py --keep-interval``) instead of its latest.

Nothing is written into a folder of final weights alone (misc/runs/<run>: config.json and
model.pt) nor into a run that is still training (scored at its latest checkpoint, with a
warning naming its step): the scores are printed, ``--json FILE`` writes them with their
protocols and library versions, ``--out DIR`` writes the report (metrics.json) and the
ground-truth plot into DIR instead of the run folder.
"""
import argparse
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path

from dataset import DatasetError
from metrics import METRIC_NAMES, metric_list
from representation import Trained, evaluation_report, log_measures
from runfolder import RunFolder, stored_model
from utils import ArgumentParser, ConfigError, DiskFull, OutOfMemory, write_json

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
    p.add_argument("--json", metavar="FILE", help="also write the scores, the evaluation "
                   "sample's measures, the protocols and the library versions to FILE (a new "
                   "file)")
    p.add_argument("--out", metavar="DIR", help="write metrics.json and the ground-truth plot "
                   "into DIR (created if missing; not a run folder) instead of the run folder")
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
        json_path = Path(args.json) if args.json else None
        if json_path is not None and (json_path.exists() or json_path.is_symlink()):
            raise ConfigError(f"--json {json_path} exists and is never overwritten; remove it "
                              f"or choose another file")
        if json_path is not None and not json_path.parent.is_dir():
            raise ConfigError(f"--json {json_path}: the folder {json_path.parent} does not "
                              f"exist; create it or choose another file")
        holder = folder.lock_holder()
        weights_only = not folder.checkpoint_path.is_file()  # config.json and model.pt alone
        target = _target(args, folder, holder, weights_only)  # before the encoding pass
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
        results = trained.evaluate(target or folder, tuple(n for n in names.split(",") if n),
                                   plot=target is not None)
        measures = trained.measures()
        log_measures(trained.step, measures)
        report = evaluation_report(trained.step, trained.data, results, "evaluate.py", measures)
        if target is not None:
            target.append_evaluation(report)
        if json_path is not None:
            write_json(json_path, dict(
                run=str(folder), **{n: r["score"] for n, r in results.items()},
                **{k: v for k, v in report.items() if k != "scores"}, results=results))
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
    written = [str(p) for p in ((target.path / target.REPORT) if target else None, json_path)
               if p is not None]
    where = (f" -> {', '.join(written)}" if written else
             " (not written: the run is in training)" if holder is not None else
             f" (not written: {folder} holds final weights alone and evaluate.py only reads it;"
             f" --json FILE or --out DIR keeps the scores)")
    print(f"step {trained.step}: " + ", ".join(
        [f"{n} {r['score']:.4f}" for n, r in results.items()]
        + [f"{n} {measures[n]:.4g}" for n in ("recon", "kl", "elbo", "i_max")]) + where)
    return 0


def _target(args, folder, holder, weights_only):
    """The RunFolder that receives metrics.json and the ground-truth plot (--out, or the run
    folder of a run that no process trains), checked writable; None: nothing is written."""
    if args.out is None:
        if holder is not None or weights_only:
            return None
        folder.check_writable("evaluate.py (metrics.json, the ground-truth plot)")
        folder.remove_orphans()  # what an interrupted write left; no run writes here now
        return folder
    out = RunFolder(args.out)
    if out.path.exists() and not out.path.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for metrics.json and the "
                          f"ground-truth plot")
    if out.path.resolve() != folder.path.resolve() or weights_only or holder is not None:
        if out.has_config() or out.weights_path.exists() or out.checkpoint_path.exists():
            raise ConfigError(f"--out {out} is a run folder; evaluate.py writes only into the "
                              f"run it scores (a run no process trains). Choose another --out")
    try:
        out.path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror or err}; choose a "
                          f"writable folder") from None
    out.check_writable("evaluate.py --out (metrics.json, the ground-truth plot)")
    return out


if __name__ == "__main__":
    sys.exit(main())
