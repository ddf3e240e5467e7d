"""Command line of Non-Synergistic VAE: parse flags into a validated Config, then hand the run
to the Solver. Nothing imports this file.

    python run.py --alpha=5.0 --omega=0.9 --metric="Test_gt" --steps=150000 --gt-interval=5000
"""
import argparse
import contextlib
import dataclasses
import io
import json
import logging
import signal
import sys
import threading
from datetime import datetime

from dataset import (CELEBA_CROPS, CELEBA_SOURCE, CELEBA_ZIP, GRIDS, DatasetError, check_data_dir,
                     download_dsprites)
from metrics import METRIC_NAMES, metric_list
from precision import PRECISIONS, device_record
from solver import (ARCHS, BOUNDS, DATASETS, INITS, OBJECTIVE_SETTINGS, OBJECTIVES, RESUMABLE,
                    SAMPLES, UPDATES, Config, Diverged, Solver, pick_device, run_metadata,
                    stored_run)
from utils import ArgumentParser, ConfigError, DiskFull, RunFolder

log = logging.getLogger("run")


def _number(name):
    """argparse type: a number within the bounds of setting ``name``; the error names them."""
    bound = BOUNDS[name]

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if bound.kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        if problem := bound.problem(value):
            raise argparse.ArgumentTypeError(problem.replace(f"got {value}", f"got {text}"))
        return value
    return parse


def _bool(text):
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _other_spelling(flag):
    """``--batch_size`` -> ``--batch-size`` and back; None for a one-word flag."""
    words = flag[2:]
    other = words.replace("_", "-") if "_" in words else words.replace("-", "_")
    return None if other == words else "--" + other


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flags with their defaults; the description and the objectives' list as written."""


def build_parser():
    d = Config()
    width = max(map(len, OBJECTIVES)) + 2
    p = ArgumentParser(
        description="Non-Synergistic VAE (Barrientos & Sootla, 2018) and baselines on dSprites.\n"
                    "Multi-word flags take '_' or '-' alike (--batch_size or --batch-size).",
        epilog="objectives (--metric; objectives.py):\n" + "\n".join(
            f"  {metric:<{width}}{objective.help}" for metric, objective in OBJECTIVES.items()),
        formatter_class=HelpFormatter)

    def group(title):
        """Adds flags to the help section ``title``, each under the original's spelling, with
        the other spelling of a multi-word flag as a hidden alias (errors name what was typed)."""
        g = p.add_argument_group(title)

        def add(flag, **kwargs):
            g.add_argument(flag, **kwargs)
            if other := _other_spelling(flag):
                g.add_argument(other, **dict(kwargs, help=argparse.SUPPRESS))
        return add

    add = group("objective")
    add("--metric", choices=OBJECTIVES, default=d.metric,
        help="experiment: the objective to train (each in one line at the end)")
    add("--update", choices=UPDATES, default=d.update,
        help="Non-Syn update: original = the original's two Adam steps exactly (0.4.1 Adam, the "
             "synergy gradient through the stale pre-step graph); two-step = the same two steps "
             "with both gradients at the step's parameters; joint = one step on "
             "recon+KL+alpha*syn")
    add("--sample", choices=SAMPLES, default=d.sample,
        help="compute the synergy term on the training batch (no_sample) or a second batch")
    add("--arch", choices=ARCHS, default=d.arch,
        help="decoder: 2020 = the original's final code; 2018 = without ReLU after its two "
             "Linear layers, the decoder of the thesis figures")
    add("--init", choices=INITS, default=d.init,
        help="weight initialisation: original = PyTorch 0.4.1's (ConvTranspose2d bounds from "
             "in_channels); current = today's PyTorch defaults")
    add("--z_dim", type=_number("z_dim"), default=d.z_dim, help="latent dimensions")
    add("--alpha", type=_number("alpha"), default=d.alpha, help="synergy penalty weight")
    add("--omega", type=_number("omega"), default=d.omega,
        help="greedy policy threshold, 0 < omega <= 1")
    add("--measure-omega", dest="measure_omega", type=_number("measure_omega"),
        default=d.measure_omega,
        help="the greedy threshold of the logged i_max (KL of the worst set, alpha-free), the "
             "same for every objective so that runs compare; syn stays alpha * I_max at --omega")
    add("--gamma", type=_number("gamma"), default=d.gamma, help="FactorVAE TC weight")
    add("--beta", type=_number("beta"), default=d.beta,
        help="beta-VAE KL weight (--metric BVAE); beta-TCVAE: TC weight beta - 1 (BTCVAE)")
    add("--lambda_od", type=_number("lambda_od"), default=d.lambda_od,
        help="DIP-VAE weight of the squared off-diagonal covariance (DIPVAE1, DIPVAE2)")
    add("--lambda_d_factor", type=_number("lambda_d_factor"), default=None,
        help="DIP-VAE diagonal weight over --lambda_od (default: 10 for DIPVAE1, 1 for DIPVAE2)")
    add("--c_max", type=_number("c_max"), default=d.c_max,
        help="AnnealedVAE's final KL capacity C (AnnealedVAE)")
    add("--c_steps", type=_number("c_steps"), default=d.c_steps,
        help="AnnealedVAE: steps over which C rises linearly from 0 to --c_max")
    add("--c_gamma", type=_number("c_gamma"), default=d.c_gamma,
        help="AnnealedVAE weight of |KL - C|")

    add = group("optimiser")
    add("--lr_VAE", type=_number("lr_VAE"), default=d.lr_VAE, help="VAE Adam lr")
    add("--beta1_VAE", type=_number("beta1_VAE"), default=d.beta1_VAE, help="VAE Adam beta1")
    add("--beta2_VAE", type=_number("beta2_VAE"), default=d.beta2_VAE, help="VAE Adam beta2")
    add("--lr_D", type=_number("lr_D"), default=d.lr_D, help="discriminator Adam lr (Factor)")
    add("--beta1_D", type=_number("beta1_D"), default=d.beta1_D, help="discriminator Adam beta1")
    add("--beta2_D", type=_number("beta2_D"), default=d.beta2_D, help="discriminator Adam beta2")
    add("--batch_size", type=_number("batch_size"), default=d.batch_size, help="batch size")
    add("--steps", type=_number("steps"), default=d.steps,
        help="optimisation steps, exactly (150000 or 1.5e5)")
    add("--seed", type=_number("seed"), default=d.seed, help="random seed")
    add("--no-cuda", dest="cuda", action="store_false", help="train on the CPU even with a GPU")
    add("--precision", choices=PRECISIONS, default=d.precision,
        help="the networks' arithmetic: fp32 = replay-exact; bf16 = autocast convolutions and "
             "linear layers (fp32 weights, optimiser, losses and synergy), faster where the "
             "GPU or CPU has native bf16, not replay-exact")

    add = group("data")
    add("--dataset", choices=DATASETS, default=d.dataset, help="dataset")
    add("--grid", choices=GRIDS, default=d.grid,
        help="dSprites grid: full (737,280 images) or reduced (11,520: every 4th orientation, "
             "8 positions per axis) for quick runs")
    add("--celeba-crop", dest="celeba_crop", choices=tuple(CELEBA_CROPS), default=d.celeba_crop,
        help="CelebA: original = resize to 64x78 and keep rows 7..71 (the thesis); resize = "
             "plain 64x64 resize; center140 / center148 = centre crop, then resize")
    add("--data-dir", dest="data_dir", default=d.data_dir,
        help="folder holding the official dSprites npz, or CelebA's img_align_celeba.zip or "
             "img_align_celeba/ (default: ./ then ./datasets); without the npz the procedural "
             "dSprites is used")
    add("--download", action="store_true",
        help="download the official dSprites npz (MD5-checked) into --data-dir (or ./datasets) "
             "first; not offered for CelebA")

    add = group("run folder")
    add("--output_dir", default=d.output_dir, help="parent folder of run folders")
    add("--run-name", dest="run_name", default=d.run_name,
        help="run folder name (default: metric, the settings of its objective (alpha and "
             "omega, gamma or beta), seed and a timestamp)")
    add("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    add("--dry-run", action="store_true", help="only check the flags and settings; write nothing")
    add("--nb-test", dest="nb_test", type=_number("nb_test"), default=d.nb_test,
        help="test images, and traversal points per latent")
    add("--log-interval", dest="log_interval", type=_number("log_interval"),
        default=d.log_interval, help="steps between log lines and metrics.jsonl records")
    add("--save-interval", dest="save_interval", type=_number("save_interval"),
        default=d.save_interval, help="steps between traversal images and checkpoints")
    add("--gt-interval", dest="gt_interval", type=_number("gt_interval"), default=d.gt_interval,
        help="steps between ground-truth mean-activation plots")
    add("--eval-metrics", dest="eval_metrics", type=metric_list, default=d.eval_metrics,
        help="disentanglement metrics computed at every --gt-interval and at the end "
             f"(comma-separated from {', '.join(METRIC_NAMES)}; or all, none)")
    add("--eval-sample", dest="eval_sample", type=_number("eval_sample"), default=d.eval_sample,
        help="images of the fixed sample (seed 0) over which the final evaluation measures "
             "recon, KL, ELBO and i_max (the summaries' measures)")

    add = group("monitoring")
    add("--viz_on", type=_bool, default=d.viz_on,
        help="stream losses to visdom (True/False; --metric test turns it on)")
    add("--viz_port", type=_number("viz_port"), default=d.viz_port, help="visdom port")
    add("--viz_il_iter", type=_number("viz_il_iter"), default=d.viz_il_iter,
        help="steps between values gathered for visdom")
    add("--viz_la_iter", type=_number("viz_la_iter"), default=d.viz_la_iter,
        help="steps between pushes to visdom")
    return p


class _Quiet(argparse.ArgumentParser):
    def error(self, message):  # e.g. an ambiguous abbreviation: the caller words it
        raise ConfigError(message)


def explicit_flags(parser, argv, with_help=False):
    """Names (dests) of the settings given on the command line, not left at their defaults,
    with abbreviations resolved as ``parser`` resolves them (and "help" for -h, --help, --he
    when ``with_help``)."""
    quiet = _Quiet(add_help=False, argument_default=argparse.SUPPRESS,
                   allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and (with_help or action.dest != "help"):
            kwargs = dict(dest=action.dest)
            if action.nargs == 0:
                kwargs.update(action="store_const", const=action.const)
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def new_run_config(argv):
    """The Config ``python run.py ARGV --dry-run`` resolves for a new run, or ConfigError with
    the last line run.py would print. study.py checks every trial with it, in its own process,
    before any trial starts (a run.py process per trial took ~3 s of CPU, mostly importing)."""
    parser = build_parser()
    parser.prog = "run.py"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # argparse prints the usage, then exits
            args = parser.parse_args(argv)
    except SystemExit:
        lines = printed.getvalue().strip().splitlines()
        raise ConfigError(lines[-1] if lines else "run.py refused its flags") from None
    try:
        config = make_config(args, explicit_flags(parser, argv))
        pick_device(config)
    except ConfigError as err:
        raise ConfigError(f"error: {err}") from None
    return config


def make_config(args, given=()):
    """The Config of a new run. ``--metric test`` means live plots: it turns visdom on, and an
    explicit ``--viz_on False`` beside it is a contradiction, not something to override."""
    fields = {f.name for f in dataclasses.fields(Config)}
    settings = {k: v for k, v in vars(args).items() if k in fields}
    if args.metric == "test":
        if "viz_on" in given and not args.viz_on:
            raise ConfigError("--metric test streams to visdom, but --viz_on False turns it off; "
                              "drop --viz_on False, or use --metric Test_gt for a run without "
                              "live plots")
        settings["viz_on"] = True
    return Config(**settings)


def default_run_name(config):
    """<metric>_<the settings that define its objective>_seed<s>_<timestamp>, e.g.
    Test_gt_alpha5.0_omega0.9_seed120_..., Factor_gamma6.4_seed1_..., VAE_seed1_..."""
    settings = [f"{name}{getattr(config, name)}" for name in OBJECTIVE_SETTINGS[config.metric]]
    if config.precision != Config.precision:
        settings.append(config.precision)
    return "_".join([config.metric, *settings, f"seed{config.seed}",
                     f"{datetime.now():%Y%m%d-%H%M%S}"])


def resume_state(folder, args, given):
    """Config and checkpoint of the run in ``folder``, and the settings changed now; flags
    given now may change RESUMABLE settings only."""
    checkpoint, stored = stored_run(folder)
    stored = stored.to_dict()
    changes = {k: getattr(args, k) for k in given if k in stored}
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE and v != stored[k]}
    if fixed:
        raise ConfigError(f"--resume keeps the run's settings; cannot change "
                          f"{', '.join('--' + k for k in sorted(fixed))} (only "
                          f"{', '.join('--' + k for k in RESUMABLE)} may change)")
    config = Config(**{**stored, **changes})
    pick_device(config)  # the stored precision must run here, before any file is touched
    if config.steps <= checkpoint["step"] and not checkpoint.get("eval_pending"):
        raise ConfigError(f"the run in {folder} is already at step {checkpoint['step']}; pass "
                          f"--steps N with N > {checkpoint['step']} to train further")
    return config, checkpoint, {k: v for k, v in changes.items() if v != stored[k]}


_SIGNALLED = []  # the Ctrl-C or SIGTERM this main() got before its training loop took over


def _interrupt(signum, frame):
    """Ctrl-C or SIGTERM while the run starts: a KeyboardInterrupt, and a note of it. Python
    runs the handler wherever the main thread is; inside a weakref callback or an at-fork hook
    (seen: an import lock's callback during CelebA preprocessing) it prints the exception and
    drops it, and the run would go on to train as if never stopped; ``_train`` checks the note."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _train(solver):
    """The Solver's loop, unless a Ctrl-C or SIGTERM came first (even one whose exception
    Python dropped)."""
    if _SIGNALLED:
        raise KeyboardInterrupt(signal.Signals(_SIGNALLED[0]).name)
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
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, given)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run(args, given):
    folder = None
    try:
        if args.dry_run:  # the resolved settings, as one JSON line after the verdict
            config = (resume_state(RunFolder(args.resume), args, given)[0] if args.resume
                      else make_config(args, given))
            pick_device(config)
            print(f"ok: the settings are valid\n{json.dumps(config.to_dict())}")
            return 0
        if args.resume:
            folder = RunFolder(args.resume)
            folder.check_run()  # before the lock: a wrong path gets no .lock file
            folder.check_no_links()
            folder.check_writable("--resume")
            with folder.writer_lock():
                # every stored field is checked and the Solver built from it before any file
                # of the run folder changes: a refused resume leaves the folder as it was
                config, checkpoint, changed = resume_state(folder, args, given)
                solver = Solver(config, folder, checkpoint)
                folder.remove_orphans()
                folder.trim_log(checkpoint["step"])
                folder.record_resume(checkpoint["step"], changed,
                                     device_record(config, solver.device))
                log.info("Resuming %s at step %d of %d", folder, checkpoint["step"], config.steps)
                finished = _train(solver)
        else:
            config = make_config(args, given)
            pick_device(config)  # refuses a precision this machine cannot run, nothing written
            if args.download and config.dataset != "dsprites":
                raise ConfigError("--download is only offered for dSprites. CelebA's Google Drive "
                                  f"downloads fail too often: get {CELEBA_ZIP} from {CELEBA_SOURCE} "
                                  "and put it in --data-dir")
            if args.download:
                download_dsprites(config.data_dir or "datasets")
            check_data_dir(config.data_dir)  # before the run folder exists
            folder = RunFolder.create(config.output_dir, config.run_name, default_run_name(config))
            log.info("Run folder: %s", folder)
            try:
                with folder.writer_lock():
                    solver = Solver(config, folder)
                    folder.write_config(run_metadata(config, solver.data, solver.device))
                    finished = _train(solver)
            except (ConfigError, DatasetError, DiskFull, KeyboardInterrupt):
                folder.remove_if_empty()  # a start that failed leaves no folder to block its name
                raise
            except Diverged as err:
                if folder.checkpoint_path.exists():
                    raise
                folder.remove_if_empty()
                if folder.path.exists():  # its log shows the divergence: kept, under a new name
                    kept = folder.set_aside("diverged")
                    raise Diverged(f"{err}; nothing to resume, so the run folder was renamed "
                                   f"{kept} (its log kept) and the name is free") from None
                raise
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
    return 0 if finished else 130


if __name__ == "__main__":
    sys.exit(main())
