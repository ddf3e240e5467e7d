"""Every setting of a run, defined once: the table ``Config`` (name, type, default, bounds or
choices, flag, help line, whether a resume may change it, and the value older checkpoints
imply), and what is derived from it: the frozen, validated Config, run.py's parser (both
spellings of a multi-word flag), IMPLIED_SETTINGS for old checkpoints, the objectives' labels,
and the command-line table of docs/cli.md (``cli_table``; a test holds the file to it)."""
import argparse
import contextlib
import dataclasses
import io
import math
from datetime import datetime
from typing import NamedTuple

from dataset import CELEBA_CROPS, DATASETS, GRIDS, DatasetError, check_data
from metrics import DEFAULT_METRICS, METRIC_NAMES, metric_list
from objectives import OBJECTIVES
from precision import PRECISIONS, pick_device
from utils import ArgumentParser, ConfigError

NONSYN = ("Test_gt", "test")
# What a reader calls each objective, and the settings that define it (the rest are unused):
# columns of objectives.OBJECTIVES, the table of every --metric
OBJECTIVE_NAMES = {metric: o.name for metric, o in OBJECTIVES.items()}
OBJECTIVE_SETTINGS = {metric: o.settings for metric, o in OBJECTIVES.items()}
LAMBDA_D_FACTOR = 10.0  # lambda_d_factor left unset: the objective's own default, else this
UPDATES = ("original", "two-step", "joint")
SAMPLES = ("no_sample", "sample")
ARCHS = ("2020", "2018")  # the final decoder; the thesis figures' decoder (no ReLU after Linear)
INITS = ("original", "current")  # PyTorch 0.4.1's default initialisation, or today's
MANY = 10**9  # the upper bound of steps and intervals
CHECKPOINT_FORMAT = 7  # bumped whenever the checkpoint's layout changes (runfolder.py)
GROUPS = ("objective", "optimiser", "data", "run folder", "monitoring")  # --help's sections


class Bound(NamedTuple):
    """The values a numeric setting may take: ``kind`` (int or float) within [low, high], or
    (low, high] with ``low_open``."""
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def problem(self, value):
        """Why ``value`` is out of bounds (text), or None when it is fine."""
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high}, got {value}"
        return None


def setting(default, group, help, *, flag=None, bound=None, choices=None, resumable=False,
            since=None, before=None):
    """One row of the settings table: ``flag`` (default ``--<name>``, the original's
    spelling), ``bound`` or ``choices``, whether ``--resume`` may change it, and, for a setting
    that checkpoints of formats below ``since`` did not store, the value ``before`` their runs
    were trained with."""
    return dataclasses.field(default=default, metadata=dict(
        group=group, help=help, flag=flag, bound=bound, choices=choices, resumable=resumable,
        since=since, before=before))


O, P, D, R, M = GROUPS  # noqa: E741


@dataclasses.dataclass(frozen=True)
class Config:
    # --- objective ---
    metric: str = setting("Test_gt", O, "experiment: the objective to train (each in one line "
                          "at the end)", choices=OBJECTIVES)
    update: str = setting("original", O, "Non-Syn update: original = the original's two Adam "
                          "steps exactly (0.4.1 Adam, the synergy gradient through the stale "
                          "pre-step graph); two-step = the same two steps with both gradients at "
                          "the step's parameters; joint = one step on recon+KL+alpha*syn",
                          choices=UPDATES)
    sample: str = setting("no_sample", O, "compute the synergy term on the training batch "
                          "(no_sample) or a second batch", choices=SAMPLES)
    arch: str = setting("2020", O, "decoder: 2020 = the original's final code; 2018 = without "
                        "ReLU after its two Linear layers, the decoder of the thesis figures",
                        choices=ARCHS, since=2, before="2020")
    init: str = setting("original", O, "weight initialisation: original = PyTorch 0.4.1's "
                        "(ConvTranspose2d bounds from in_channels); current = today's PyTorch "
                        "defaults", choices=INITS, since=2, before="current")
    z_dim: int = setting(10, O, "latent dimensions", bound=Bound(int, 1, 1024))
    alpha: float = setting(1.5, O, "synergy penalty weight", bound=Bound(float, 0))
    omega: float = setting(0.8, O, "greedy policy threshold, 0 < omega <= 1",
                           bound=Bound(float, 0, 1, low_open=True))
    measure_omega: float = setting(
        0.9, O, "the greedy threshold of the logged i_max (KL of the worst set, alpha-free), the "
        "same for every objective so that runs compare; syn stays alpha * I_max at --omega",
        flag="--measure-omega", bound=Bound(float, 0, 1, low_open=True), since=4, before=0.9)
    gamma: float = setting(6.4, O, "FactorVAE TC weight", bound=Bound(float, 0))
    beta: float = setting(4.0, O, "beta-VAE KL weight (--metric BVAE); beta-TCVAE: TC weight "
                          "beta - 1 (BTCVAE)", bound=Bound(float, 0))
    lambda_od: float = setting(10.0, O, "DIP-VAE weight of the squared off-diagonal covariance "
                               "(DIPVAE1, DIPVAE2)", bound=Bound(float, 0), since=5, before=10.0)
    lambda_d_factor: float | None = setting(
        None, O, "DIP-VAE diagonal weight over --lambda_od (default: 10 for DIPVAE1, 1 for "
        "DIPVAE2)", bound=Bound(float, 0), since=5, before=10.0)
    c_max: float = setting(25.0, O, "AnnealedVAE's final KL capacity C (AnnealedVAE), in nats",
                           bound=Bound(float, 0, 1e6), since=5, before=25.0)
    c_steps: int = setting(100000, O, "AnnealedVAE: steps over which C rises linearly from 0 "
                           "to --c_max", bound=Bound(int, 1, MANY), since=5, before=100_000)
    c_gamma: float = setting(1000.0, O, "AnnealedVAE weight of |KL - C|", bound=Bound(float, 0),
                             since=5, before=1000.0)
    # --- optimiser ---
    lr_VAE: float = setting(1e-4, P, "VAE Adam lr", bound=Bound(float, 0, 1, low_open=True))
    beta1_VAE: float = setting(0.9, P, "VAE Adam beta1", bound=Bound(float, 0, 1))
    beta2_VAE: float = setting(0.999, P, "VAE Adam beta2", bound=Bound(float, 0, 1))
    lr_D: float = setting(1e-4, P, "discriminator Adam lr (Factor)",
                          bound=Bound(float, 0, 1, low_open=True))
    beta1_D: float = setting(0.5, P, "discriminator Adam beta1", bound=Bound(float, 0, 1))
    beta2_D: float = setting(0.9, P, "discriminator Adam beta2", bound=Bound(float, 0, 1))
    batch_size: int = setting(64, P, "batch size", bound=Bound(int, 2, 8192))
    steps: int = setting(300000, P, "optimisation steps, exactly (150000 or 1.5e5)",
                         bound=Bound(int, 1, MANY), resumable=True)
    seed: int = setting(120, P, "random seed",
                        bound=Bound(int, 0, 2**32 - 1))
    cuda: bool = setting(True, P, "train on the CPU even with a GPU", flag="--no-cuda",
                         resumable=True)
    precision: str = setting(
        "fp32", P, "the networks' arithmetic: fp32 = replay-exact; bf16 = autocast convolutions "
        "and linear layers (fp32 weights, optimiser, losses and synergy), faster where the GPU "
        "or CPU has native bf16, not replay-exact", choices=PRECISIONS, since=3, before="fp32")
    # --- data ---
    dataset: str = setting("dsprites", D, "dataset: dsprites; its variants color_dsprites, "
                           "noisy_dsprites, scream_dsprites (disentanglement_lib's, 3 channels); "
                           "celeba", choices=DATASETS)
    scream_image: str | None = setting(
        None, D, "scream_dsprites: the Scream painting (not shipped; disentanglement_lib uses "
        "Wikimedia's The_Scream.jpg)", flag="--scream-image", resumable=True, since=7,
        before=None)
    grid: str = setting("full", D, "dSprites grid: full (737,280 images) or reduced (11,520: "
                        "every 4th orientation, 8 positions per axis) for quick runs",
                        choices=GRIDS)
    celeba_crop: str = setting(
        "original", D, "CelebA: original = resize to 64x78 and keep rows 7..71 (the thesis); "
        "resize = plain 64x64 resize; center140 / center148 = centre crop, then resize",
        flag="--celeba-crop", choices=tuple(CELEBA_CROPS))
    data_dir: str | None = setting(
        None, D, "folder holding the official dSprites npz, or CelebA's img_align_celeba.zip or "
        "img_align_celeba/ (default: ./ then ./datasets); without the npz the procedural "
        "dSprites is used", flag="--data-dir", resumable=True)
    # --- run folder ---
    output_dir: str = setting("outputs", R, "parent folder of run folders")
    run_name: str | None = setting(None, R, "run folder name (default: metric, the settings of "
                                   "its objective (alpha and omega, gamma or beta), seed and a "
                                   "timestamp)", flag="--run-name")
    nb_test: int = setting(9, R, "test images, and traversal points per latent",
                           flag="--nb-test", bound=Bound(int, 1, 100))
    log_interval: int = setting(500, R, "steps between log lines and metrics.jsonl records",
                                flag="--log-interval", bound=Bound(int, 1, MANY), resumable=True)
    save_interval: int = setting(2000, R, "steps between traversal images and checkpoints",
                                 flag="--save-interval", bound=Bound(int, 1, MANY),
                                 resumable=True)
    keep_interval: int = setting(
        0, R, "steps between checkpoints kept beside the latest, as checkpoints/step_N.pt, for "
        "evaluate.py --step N (0: keep only the latest)", flag="--keep-interval",
        bound=Bound(int, 0, MANY), resumable=True, since=6, before=0)
    gt_interval: int = setting(10000, R, "steps between ground-truth mean-activation plots",
                               flag="--gt-interval", bound=Bound(int, 1, MANY), resumable=True)
    eval_metrics: str = setting(
        ",".join(DEFAULT_METRICS), R, "disentanglement metrics computed at every --gt-interval "
        f"and at the end (comma-separated from {', '.join(METRIC_NAMES)}; or all, none)",
        flag="--eval-metrics", resumable=True)
    eval_sample: int = setting(
        10_000, R, "images of the fixed sample (seed 0) over which the final evaluation "
        "measures recon, KL, ELBO and i_max (the summaries' measures)", flag="--eval-sample",
        bound=Bound(int, 1, 737_280), resumable=True, since=4, before=10_000)
    # --- monitoring ---
    viz_on: bool = setting(False, M, "stream losses to visdom (True/False; --metric test turns "
                           "it on)", resumable=True)
    viz_port: int = setting(8097, M, "visdom port", bound=Bound(int, 1, 65535), resumable=True)
    viz_il_iter: int = setting(20, M, "steps between values gathered for visdom",
                               bound=Bound(int, 1, MANY), resumable=True)
    viz_la_iter: int = setting(100, M, "steps between pushes to visdom",
                               bound=Bound(int, 1, MANY), resumable=True)

    def __post_init__(self):
        """Check every setting as its flag would, so that a Config built in code or read from a
        checkpoint is as valid as one from the command line; ints pass for floats."""
        if self.lambda_d_factor is None:  # disentanglement_lib's default for the DIP type
            objective = OBJECTIVES.get(self.metric)
            own = objective.defaults if objective else {}
            object.__setattr__(self, "lambda_d_factor",
                               own.get("lambda_d_factor", LAMBDA_D_FACTOR))
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name in BOUNDS:
                bound = BOUNDS[name]
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not numeric or (bound.kind is int and not float(value).is_integer()):
                    raise ConfigError(f"{name} must be "
                                      f"{'a whole number' if bound.kind is int else 'a number'}"
                                      f", got {value!r}")
                object.__setattr__(self, name, bound.kind(value))
                if problem := bound.problem(value):
                    raise ConfigError(f"{name} {problem}")
            elif name in CHOICES:
                if value not in CHOICES[name]:
                    raise ConfigError(f"{name} must be one of {', '.join(CHOICES[name])}, "
                                      f"got {value!r}")
            elif field.type is bool:
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be True or False, got {value!r}")
            elif name == "eval_metrics":
                unknown = [n for n in self.metric_names if n not in METRIC_NAMES]
                if not isinstance(value, str) or unknown:
                    raise ConfigError(f"eval_metrics must name metrics from "
                                      f"{', '.join(METRIC_NAMES)}, got {value!r}")
            elif not (isinstance(value, str) or (value is None and field.default is None)):
                raise ConfigError(f"{name} must be text, got {value!r}")
        if self.run_name is not None:
            name = self.run_name
            if (not name.strip() or name.startswith(".") or name != name.strip()
                    or any(c in name for c in "/\\\0") or not name.isprintable()
                    or len(name.encode()) > 200):
                raise ConfigError(f"run_name (--run-name) must be a visible single folder name: "
                                  f"not blank, not starting with '.', no leading or trailing "
                                  f"space, without '/', '\\' or control characters, at most 200 "
                                  f"bytes; got {name!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def metric_names(self):
        return tuple(n for n in self.eval_metrics.split(",") if n)

    @classmethod
    def from_stored(cls, stored, where):
        """The Config of stored settings (a checkpoint's, config.json's), checked like flags:
        every setting present, none unknown, each of the right type and within its bounds."""
        if not isinstance(stored, dict):
            raise ConfigError(f"{where} holds no settings")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(stored) - names), sorted(names - set(stored))
        if unknown or missing:
            raise ConfigError(f"{where} does not hold this code's settings "
                              f"(unknown: {', '.join(unknown) or 'none'}; missing: "
                              f"{', '.join(missing) or 'none'})")
        try:
            return cls(**stored)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


# --- derived from the table -----------------------------------------------------------------------

SETTINGS = {f.name: f for f in dataclasses.fields(Config)}
BOUNDS = {name: f.metadata["bound"] for name, f in SETTINGS.items() if f.metadata["bound"]}
CHOICES = {name: f.metadata["choices"] for name, f in SETTINGS.items() if f.metadata["choices"]}
# Settings that may change when a run is resumed; everything else is fixed by the checkpoint.
RESUMABLE = tuple(name for name, f in SETTINGS.items() if f.metadata["resumable"])
# Settings that checkpoints of an older format did not store, with the values their runs were
# trained with (the 2020 decoder and today's initialisation before format 2, fp32 before 3, the
# measurement omega and sample size they are evaluated with now before 4, the field objectives'
# defaults, which no run of theirs used, before 5). A config.json that lacks one of these
# settings was written before it existed: it gets the same value (format 1's table).
IMPLIED_SETTINGS = {fmt: {name: f.metadata["before"] for name, f in SETTINGS.items()
                          if f.metadata["since"] and f.metadata["since"] > fmt}
                    for fmt in range(1, CHECKPOINT_FORMAT)}


def flag_of(name):
    """The flag of setting ``name`` as the original spelled it (``--z_dim``, ``--log-interval``)."""
    return SETTINGS[name].metadata["flag"] or f"--{name}"


# Settings a label names when they are not the default, besides the objective's own: the
# network and arithmetic, and the objective's further settings (runs that differ only there
# were titled alike). Settings every run of a study shares (batch size, steps) stay unnamed.
LABELLED = ("arch", "init", "precision")
OBJECTIVE_EXTRAS = {"AnnealedVAE": ("c_steps", "c_gamma"),
                    "Factor": ("lr_D", "beta1_D", "beta2_D")}


def objective_label(settings):
    """A reader's name for a run's objective from its settings (a Config's dict, or part of
    one: missing settings are the defaults), e.g. "Non-Syn VAE (alpha 5, omega 0.9)",
    "FactorVAE (gamma 6.4)", "VAE"; a non-default update, sample, decoder or precision is named
    too ("VAE (arch 2018)")."""
    metric = settings.get("metric", Config.metric)
    default = Config(metric=metric if metric in OBJECTIVES else Config.metric)
    get = lambda name: settings.get(name, getattr(default, name))  # noqa: E731
    parts = [f"{name} {get(name):g}" for name in OBJECTIVE_SETTINGS[metric]]
    others = LABELLED + OBJECTIVE_EXTRAS.get(metric, ()) + (
        ("update", "sample") if metric in NONSYN else ())
    for name in sorted(others, key=list(SETTINGS).index):  # the table's order
        value = get(name)
        if value != getattr(default, name):
            parts.append(value if name == "precision" else
                         f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
    return OBJECTIVE_NAMES[metric] + (f" ({', '.join(parts)})" if parts else "")


def file_stem(config):
    """The prefix of a run's files named by step: the original's ``alpha_<alpha>`` for Non-Syn
    VAE (``alpha_5.0_traversal_2000.png``), for every other objective its name and its own
    settings as in run names (``Factor_gamma6.4_gt_5000.png``, ``VAE_gt_5000.png``): never a
    setting the objective does not have."""
    if config.metric in NONSYN:
        return f"alpha_{config.alpha}"
    return "_".join([config.metric, *(f"{name}{getattr(config, name)}"
                                      for name in OBJECTIVE_SETTINGS[config.metric])])


def default_run_name(config):
    """<metric>_<the settings that define its objective>_seed<s>_<timestamp>, e.g.
    Test_gt_alpha5.0_omega0.9_seed120_..., Factor_gamma6.4_seed1_..., VAE_seed1_..."""
    settings = [f"{name}{getattr(config, name)}" for name in OBJECTIVE_SETTINGS[config.metric]]
    if config.precision != Config.precision:
        settings.append(config.precision)
    return "_".join([config.metric, *settings, f"seed{config.seed}",
                     f"{datetime.now():%Y%m%d-%H%M%S}"])


# --- the command line -----------------------------------------------------------------------------

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


def _flag_kwargs(name):
    """argparse's keywords for setting ``name``'s flag, from its row of the table."""
    field = SETTINGS[name]
    meta = field.metadata
    kwargs = dict(dest=name, default=field.default, help=meta["help"])
    if name == "cuda":
        return dict(kwargs, action="store_false", default=True)
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    elif meta["bound"]:
        kwargs["type"] = _number(name)
    elif field.type is bool:
        kwargs["type"] = _bool
    elif name == "eval_metrics":
        kwargs["type"] = metric_list
    return kwargs


# flags that are actions, not settings, after the setting they follow in --help
ACTIONS = {
    "data_dir": [("--download", dict(action="store_true", help=(
        "download the official dSprites npz (MD5-checked) into --data-dir (or ./datasets) "
        "first; not offered for CelebA")))],
    "run_name": [("--resume", dict(metavar="RUN_DIR", help="continue the run in RUN_DIR from "
                                                           "its checkpoint")),
                 ("--dry-run", dict(action="store_true",
                                    help="only check the flags and settings; write nothing"))],
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flags with their defaults; the description and the objectives' list as written."""


def build_parser():
    """run.py's parser: one flag per setting of the table, in --help sections, each under the
    original's spelling with the other spelling of a multi-word flag as a hidden alias (errors
    name what was typed); the actions --download, --resume and --dry-run."""
    width = max(map(len, OBJECTIVES)) + 2
    p = ArgumentParser(
        prog="run.py",
        description="Non-Synergistic VAE (Barrientos & Sootla, 2018) and baselines on dSprites.\n"
                    "Multi-word flags take '_' or '-' alike (--batch_size or --batch-size).",
        epilog="objectives (--metric; objectives.py):\n" + "\n".join(
            f"  {metric:<{width}}{objective.help}" for metric, objective in OBJECTIVES.items()),
        formatter_class=HelpFormatter)
    groups = {title: p.add_argument_group(title) for title in GROUPS}

    def add(group, flag, kwargs):
        group.add_argument(flag, **kwargs)
        if other := _other_spelling(flag):
            group.add_argument(other, **dict(kwargs, help=argparse.SUPPRESS))

    for name, field in SETTINGS.items():
        group = groups[field.metadata["group"]]
        add(group, flag_of(name), _flag_kwargs(name))
        for flag, kwargs in ACTIONS.get(name, ()):
            add(group, flag, kwargs)
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


def make_config(args, given=()):
    """The Config of a new run. ``--metric test`` means live plots: it turns visdom on, and an
    explicit ``--viz_on False`` beside it is a contradiction, not something to override."""
    settings = {k: v for k, v in vars(args).items() if k in SETTINGS}
    if args.metric == "test":
        if "viz_on" in given and not args.viz_on:
            raise ConfigError("--metric test streams to visdom, but --viz_on False turns it off; "
                              "drop --viz_on False, or use --metric Test_gt for a run without "
                              "live plots")
        settings["viz_on"] = True
    return Config(**settings)


def new_run_config(argv):
    """The Config ``python run.py ARGV --dry-run`` resolves for a new run (its data checked as
    the run checks it), or ConfigError with the last line run.py would print. study.py checks every trial with it, in its own process,
    before any trial starts (a run.py process per trial took ~3 s of CPU, mostly importing)."""
    parser = build_parser()
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
        check_data(config.dataset, config.data_dir, config.scream_image)
    except (ConfigError, DatasetError) as err:
        raise ConfigError(f"error: {err}") from None
    return config


def cli_table():
    """The command line as markdown tables (docs/cli.md holds them; a test keeps them equal):
    per section, each flag with its default, whether ``--resume`` may change it, and its help
    line."""
    lines = []
    for title in GROUPS:
        lines += ["", f"**{title}**", "", "| flag | default | on resume | what it sets |",
                  "| --- | --- | --- | --- |"]
        for name, field in SETTINGS.items():
            if field.metadata["group"] != title:
                continue
            resume = "may change" if field.metadata["resumable"] else "kept"
            default = "off" if name == "cuda" else (
                "" if field.default in (None, "") else f"`{field.default}`")
            rows = [(flag_of(name), default, resume, field.metadata["help"])]
            rows += [(flag, "off" if kw.get("action") == "store_true" else "", "", kw["help"])
                     for flag, kw in ACTIONS.get(name, ())]
            lines += [f"| `{flag}` | {shown} | {resume} | {text.replace('|', chr(92) + '|')} |"
                      for flag, shown, resume, text in rows]
    return "\n".join(lines[1:]) + "\n"
