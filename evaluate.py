"""Evaluate a finished or interrupted run without retraining.

    python evaluate.py RUN_DIR [--eval-metrics all] [--step N] [--json FILE] [--out DIR]
    python evaluate.py --encoder FILE.py:FUNCTION [--dataset dsprites] [--grid full] [--json FILE]
    python evaluate.py --encoder MODEL.pt ...     (a TorchScript module)

Loads the run's checkpoint with its stored config, encodes the whole dSprites grid once,
draws the ground-truth plot for the checkpoint's step (unless the run already has it), measures
recon, KL, ELBO and i_max over the fixed evaluation sample, and appends all of it, with the
protocols and library versions, to RUN_DIR/metrics.json. The metrics are the run's own
(``--eval-metrics`` of its config, factor_vae,mig by default); ``--eval-metrics all`` for all
of metrics.METRIC_NAMES (DCI alone takes minutes). ``--step N`` scores the checkpoint the run kept at step N
(``run.py --keep-interval``) instead of its latest.

Nothing is written into a folder of final weights alone (misc/runs/<run>: config.json and
model.pt; a study's copy of one, with the imported.json of ``study.py --import-finished``, is
the study's own and is written into) nor into a run that is still training (scored at its latest checkpoint, with a
warning naming its step): the scores are printed, ``--json FILE`` writes them with their
protocols and library versions, ``--out DIR`` writes the report (metrics.json) and the
ground-truth plot into DIR instead of the run folder.

``--precision fp32`` scores a bf16 run in fp32 (on a machine without native bf16, where
emulated bf16 would take hours); those scores are printed, or written with --json / --out, never
into the run's own metrics.json.

``--encoder`` scores an encoder from any codebase with the same data, protocols and seeds as a
run (``representation.score``, docs/metrics.md): FUNCTION takes a float32 tensor (N, C, 64, 64)
in [0, 1] on the CPU and returns (N, d) codes; nothing is written but ``--json``.
"""
import argparse
import dataclasses
import importlib.util
import logging
import signal
import sys
import threading
from pathlib import Path

import torch

from dataset import FACTOR_DATASETS, GRIDS, DatasetError, load_dataset
from metrics import DEFAULT_METRICS, METRIC_NAMES, metric_list
from precision import PRECISIONS, stored_run_precision
from representation import (Trained, last_line, evaluation_report, log_measures,
                            score_data)
from runfolder import RunFolder, stored_model
from utils import ArgumentParser, ConfigError, DiskFull, OutOfMemory, write_json

log = logging.getLogger("evaluate")


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help=f"a run folder with {RunFolder.CHECKPOINT} (or "
                                                   f"{RunFolder.CONFIG} and {RunFolder.WEIGHTS})")
    p.add_argument("--encoder", metavar="FILE.py:FUNCTION | MODEL.pt",
                   help="instead of a run: score any encoder, a Python function (float32 "
                        "images (N, C, 64, 64) in [0, 1] on the CPU -> (N, d) codes) or a "
                        "TorchScript module, with a run's data, protocols and seeds")
    p.add_argument("--dataset", default="dsprites", choices=FACTOR_DATASETS,
                   help="with --encoder: the data to score on (default dsprites)")
    p.add_argument("--grid", default="full", choices=GRIDS,
                   help="with --encoder: the factor grid (default full)")
    p.add_argument("--scream-image", default=None,
                   help="with --encoder --dataset scream_dsprites: the Scream painting")
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
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="score at this precision instead of the run's own (fp32 for a bf16 run "
                        "on a machine without native bf16; scores may then differ from its "
                        "recorded ones in the last digits, and nothing is written into the run "
                        "folder)")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="evaluate on the CPU")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    if (args.run_dir is None) == (args.encoder is None):
        p.error("give a run folder or --encoder FILE.py:FUNCTION (or MODEL.pt), one of them")
    if args.encoder is not None:
        given = [f for f in ("step", "out", "precision") if getattr(args, f) is not None]
        if given:
            p.error(f"--{given[0]} is for a run folder; an encoder is called as it is, and "
                    f"--encoder writes only --json")
        return _scored_encoder(args)
    given = [f for f, default in (("--dataset", "dsprites"), ("--grid", "full"),
                                  ("--scream-image", None))
             if getattr(args, f[2:].replace("-", "_")) != default]
    if given:
        p.error(f"{given[0]} is for --encoder; a run is scored on its own data")
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


def _scored_encoder(args):
    """evaluate.py --encoder: the scores printed, and written to --json only."""
    json_path = Path(args.json) if args.json else None
    try:
        _check_json(json_path)
        encode, described = load_encoder(args.encoder)
        names = tuple(n for n in (args.eval_metrics if args.eval_metrics is not None
                                  else ",".join(DEFAULT_METRICS)).split(",") if n)
        data = load_dataset(args.dataset, args.data_dir, args.grid,
                            scream_image=args.scream_image)
        results = score_data(encode, data, names)
        if json_path is not None:
            report = evaluation_report(None, data, results, "evaluate.py --encoder")
            write_json(json_path, dict(
                encoder=described, **{n: r["score"] for n, r in results.items()},
                **{k: v for k, v in report.items() if k not in ("scores", "step", "measures")},
                results=results))
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except DiskFull as err:
        print(f"error: no space left on device while writing {err.path or 'a file'}",
              file=sys.stderr)
        return 3
    print(f"{described} on {args.dataset} ({args.grid} grid): " + ", ".join(
        f"{n} {r['score']:.4f}" for n, r in results.items())
        + (f" -> {json_path}" if json_path else ""))
    return 0


def load_encoder(text):
    """(callable, description) of --encoder: FILE.py:FUNCTION (the module is run as a script
    would import it, its folder first on sys.path) or a TorchScript MODEL.pt; ConfigError,
    one line, for a missing file or name or a module that fails to import."""
    if text.endswith(".pt"):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--encoder {text}: no such file")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ConfigError(f"--encoder {text} is not a TorchScript module (torch.jit.load: "
                              f"{first}); save one with torch.jit.save(torch.jit.script(m)), "
                              f"or give FILE.py:FUNCTION") from None
        module.eval()
        return module, f"TorchScript {path.name}"
    path_text, _, name = text.rpartition(":")
    if not name or not path_text.endswith(".py"):
        raise ConfigError(f"--encoder {text}: give FILE.py:FUNCTION (a Python file and the "
                          f"function in it) or MODEL.pt (a TorchScript module)")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"--encoder {text}: no such file {path}")
    spec = importlib.util.spec_from_file_location(f"_encoder_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's module, whatever it raises: one line
        raise ConfigError(f"--encoder {text}: importing {path} raised "
                          f"{last_line(err)}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    encode = getattr(module, name, None)
    if not callable(encode):
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"--encoder {text}: {path} has no function {name}"
                          + (f" (it defines {', '.join(defined)})" if defined else ""))
    return encode, f"{path.name}:{name}"


def _check_json(json_path):
    if json_path is None:
        return
    if json_path.exists() or json_path.is_symlink():
        raise ConfigError(f"--json {json_path} exists and is never overwritten; remove it or "
                          f"choose another file")
    if not json_path.parent.is_dir():
        raise ConfigError(f"--json {json_path}: the folder {json_path.parent} does not exist; "
                          f"create it or choose another file")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _evaluate(args, folder):
    try:
        checkpoint, stored = stored_model(folder, args.step)
        if stored.dataset not in FACTOR_DATASETS:
            raise ConfigError(f"{folder} was trained on {stored.dataset}, which has no "
                              f"ground-truth factors to score against")
        json_path = Path(args.json) if args.json else None
        _check_json(json_path)
        holder = folder.lock_holder()
        stored = dataclasses.replace(stored, viz_on=False, cuda=args.cuda and stored.cuda,
                                     data_dir=args.data_dir or stored.data_dir)
        precision = stored_run_precision(stored, args.precision, "evaluate.py")
        own = precision == stored.precision  # else never into the run's own metrics.json
        # config.json and model.pt alone (misc/runs/<run>) are read-only; a study's copy of one
        # (study.py --import-finished wrote imported.json beside it) is the study's to score
        weights_only = (not folder.checkpoint_path.is_file()
                        and not (folder.path / folder.IMPORTED).is_file())
        target = _target(args, folder, holder, weights_only or not own)  # before encoding
        if holder is not None:
            log.warning("warning: %s is still training (PID %s): scoring its %s checkpoint, "
                        "step %d of %d, and writing nothing into the run folder (the run "
                        "writes its own evaluations)", folder, holder,
                        "latest" if args.step is None else "kept", checkpoint["step"],
                        stored.steps)
        names = stored.eval_metrics if args.eval_metrics is None else args.eval_metrics
        trained = Trained.build(dataclasses.replace(stored, precision=precision), checkpoint)
        results = trained.evaluate(target or folder, tuple(n for n in names.split(",") if n),
                                   plot=target is not None)
        measures = trained.measures()
        log_measures(trained.step, measures)
        report = evaluation_report(trained.step, trained.data, results, "evaluate.py" if own
                                   else f"evaluate.py --precision {precision}", measures)
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
             f" (not written: scored in {precision}, not the run's own {stored.precision}; "
             f"--json FILE or --out DIR keeps the scores)" if not own else
             f" (not written: {folder} holds final weights alone and evaluate.py only reads it;"
             f" --json FILE or --out DIR keeps the scores)")
    print(f"step {trained.step}: " + ", ".join(
        [f"{n} {r['score']:.4f}" for n, r in results.items()]
        + [f"{n} {measures[n]:.4g}" for n in ("recon", "kl", "elbo", "i_max")]) + where)
    return 0


def _target(args, folder, holder, read_only):
    """The RunFolder that receives metrics.json and the ground-truth plot (--out, or the run
    folder of a run that no process trains), checked writable; None: nothing is written.
    ``read_only``: a folder of final weights alone, or scores at another precision than the
    run's."""
    if args.out is None:
        if holder is not None or read_only:
            return None
        folder.check_writable("evaluate.py (metrics.json, the ground-truth plot)")
        folder.remove_orphans()  # what an interrupted write left; no run writes here now
        return folder
    out = RunFolder(args.out)
    if out.path.exists() and not out.path.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for metrics.json and the "
                          f"ground-truth plot")
    if out.path.resolve() != folder.path.resolve() or read_only or holder is not None:
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
