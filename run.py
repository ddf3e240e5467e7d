"""Command line of Non-Synergistic VAE: parse flags into a validated Config, then hand the run
to the Solver. Nothing imports this file.

    python run.py --alpha=5.0 --omega=0.9 --metric="Test_gt" --steps=150000 --gt-interval=5000
"""
import json
import logging
import signal
import sys
import threading

from config import build_parser, default_run_name, explicit_flags, make_config
from dataset import CELEBA_SOURCE, CELEBA_ZIP, DatasetError, check_data, download_dsprites
from precision import pick_device
from runfolder import RunFolder, resume_run, resumed_settings, start_run
from solver import Solver
from utils import (METRICS_ADDRESS_SPACE, ConfigError, DiskFull, Diverged, OutOfMemory,
                   address_space_limit)

log = logging.getLogger("run")


_SIGNALLED = []  # the Ctrl-C or SIGTERM this main() got before its training loop took over
_TRAINING = []  # the Solver whose loop ran, once it has: a signal after its end stops nothing


def _interrupt(signum, frame):
    """Ctrl-C or SIGTERM while the run starts: a KeyboardInterrupt, and a note of it. Python
    runs the handler wherever the main thread is; inside a weakref callback or an at-fork hook
    (seen: an import lock's callback during CelebA preprocessing) it prints the exception and
    drops it, and the run would go on to train as if never stopped; ``_train`` checks the note.
    Once the run is finished (its final checkpoint written), the signal is only reported."""
    if _TRAINING and _TRAINING[0].finished():
        log.warning("%s after the run finished: nothing was left to stop",
                    signal.Signals(signum).name)
        return
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _train(solver):
    """The Solver's loop, unless a Ctrl-C or SIGTERM came first (even one whose exception
    Python dropped)."""
    if _SIGNALLED:
        raise KeyboardInterrupt(signal.Signals(_SIGNALLED[0]).name)
    _TRAINING.append(solver)
    limit = address_space_limit()
    if limit is not None and limit < METRICS_ADDRESS_SPACE and solver.config.metric_names:
        log.warning("warning: the address-space limit (ulimit -v) is %.2f GiB; the metrics' "
                    "evaluations needed about %.1f GiB here and may stop the run for lack of "
                    "memory: raise the limit, or train with --eval-metrics none and score the "
                    "run later with evaluate.py", limit / 2**30, METRICS_ADDRESS_SPACE / 2**30)
    return solver.train()


def main(argv=None):
    """Parse ``argv`` (default sys.argv[1:]), train, and return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Until the Solver's loop takes over SIGTERM (to stop at a step boundary with a checkpoint),
    # SIGTERM interrupts like Ctrl-C, so that data preparation cleans up after itself; both are
    # noted (_interrupt), so that one whose exception Python dropped still stops the start.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        _SIGNALLED.clear()
        _TRAINING.clear()
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, given)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _TRAINING.clear()


def _given_settings(args, given):
    """{setting: value} of the flags given on the command line (what a resume may change)."""
    return {k: getattr(args, k) for k in given if hasattr(args, k)}


def _run(args, given):
    folder = None
    try:
        if args.dry_run:  # the resolved settings, as one JSON line after the verdict
            config = (resumed_settings(RunFolder(args.resume), _given_settings(args, given))[0]
                      if args.resume else make_config(args, given))
            pick_device(config)
            check_data(config.dataset, config.data_dir, config.scream_image)  # as the run would, before writing
            print(f"ok: the settings are valid\n{json.dumps(config.to_dict())}")
            return 0
        if args.resume:
            folder = RunFolder(args.resume)
            build = lambda config, device, checkpoint: Solver(  # noqa: E731
                config, folder, checkpoint, device=device)
            with resume_run(folder, _given_settings(args, given), build) as solver:
                finished = _train(solver)
        else:
            config = make_config(args, given)
            device = pick_device(config)  # refuses a precision this machine cannot run
            if args.download and config.dataset != "dsprites":
                raise ConfigError("--download is only offered for dSprites. CelebA's Google Drive "
                                  f"downloads fail too often: get {CELEBA_ZIP} from {CELEBA_SOURCE} "
                                  "and put it in --data-dir")
            if args.download:
                download_dsprites(config.data_dir or "datasets")
            check_data(config.dataset, config.data_dir, config.scream_image)  # before the run folder exists
            folder = RunFolder.create(config.output_dir, config.run_name, default_run_name(config))
            log.info("Run folder: %s", folder)
            build = lambda config, device: Solver(config, folder, device=device)  # noqa: E731
            with start_run(folder, config, device, build) as solver:
                finished = _train(solver)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if folder is not None and folder.checkpoint_path.exists():
            hint = f"resume from its last checkpoint with: python run.py --resume {folder}"
        else:
            hint = "nothing was left to resume; start the run again"
        print(f"error: interrupted; {hint}", file=sys.stderr)
        return 130
    except (Diverged, DiskFull) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except OutOfMemory as err:
        hint = (f"; then resume from the last checkpoint: python run.py --resume {folder}"
                if folder is not None and folder.checkpoint_path.exists() else
                "; it had no checkpoint yet: start it again")
        print(f"error: {err}{hint}", file=sys.stderr)
        return 3
    return 0 if finished else 130


if __name__ == "__main__":
    sys.exit(main())
