"""Command line of Non-Synergistic VAE: parse and validate flags into a frozen Config, then hand
the run to the Solver.

    python run.py --alpha=5.0 --omega=0.9 --metric="Test_gt" --steps=150000 --gt-interval=5000
"""
import argparse
import dataclasses
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from dataset import CELEBA_CROPS, GRIDS
from metrics import DEFAULT_METRICS, METRIC_NAMES

log = logging.getLogger("run")

METRICS = ("Test_gt", "test", "VAE", "BVAE", "Factor")
UPDATES = ("two-step", "joint")
SAMPLES = ("no_sample", "sample")
DATASETS = ("dsprites", "celeba")
# Settings that may change when a run is resumed; everything else is fixed by the checkpoint.
RESUMABLE = ("steps", "log_interval", "save_interval", "gt_interval", "viz_on", "viz_port",
             "viz_il_iter", "viz_la_iter", "cuda", "data_dir", "eval_metrics")


class ConfigError(ValueError):
    """A setting is invalid or conflicts with the run being resumed."""


@dataclasses.dataclass(frozen=True)
class Config:
    metric: str = "Test_gt"  # experiment: Test_gt/test (Non-Syn VAE), VAE, BVAE, Factor
    update: str = "two-step"  # Non-Syn update: two Adam steps (original) or one joint loss
    sample: str = "no_sample"  # synergy on the training batch, or on a second batch
    z_dim: int = 10  # latent dimensions
    alpha: float = 1.5  # weight of the synergy penalty
    omega: float = 0.8  # greedy policy: a latent joins the best set if omega * I(new) > I(old)
    gamma: float = 6.4  # FactorVAE total-correlation weight
    beta: float = 4.0  # beta-VAE KL weight
    lr_VAE: float = 1e-4
    beta1_VAE: float = 0.9
    beta2_VAE: float = 0.999
    lr_D: float = 1e-4
    beta1_D: float = 0.5
    beta2_D: float = 0.9
    batch_size: int = 64
    steps: int = 300000  # optimisation steps, exactly
    dataset: str = "dsprites"
    grid: str = "full"  # dSprites factor grid: full (737,280 images) or reduced (11,520)
    celeba_crop: str = "original"  # how CelebA photos become 64x64
    data_dir: str | None = None  # where the official npz is looked for (default ./, ./datasets)
    output_dir: str = "outputs"
    run_name: str | None = None
    cuda: bool = True  # use a GPU when one is available
    nb_test: int = 9  # test images, and points per latent traversal
    seed: int = 120  # the original's hard-coded seed, now really the --seed default
    log_interval: int = 500
    save_interval: int = 2000  # traversal image + checkpoint
    gt_interval: int = 10000  # ground-truth mean-activation plot
    viz_on: bool = False
    viz_port: int = 8097
    viz_il_iter: int = 20  # gather visdom values every N steps
    viz_la_iter: int = 100  # push them every N steps
    eval_metrics: str = ",".join(DEFAULT_METRICS)  # disentanglement metrics at every gt-interval

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def metric_names(self):
        return tuple(n for n in self.eval_metrics.split(",") if n)


def _number(kind, low=None, high=None, low_open=False):
    """argparse type: a number of ``kind`` within bounds; the error names the bound."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    return parse


def _bool(text):
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def metric_list(text):
    """argparse type: comma-separated metric names, 'all' or 'none' -> normalised string."""
    if text == "all":
        return ",".join(METRIC_NAMES)
    if text == "none":
        return ""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(METRIC_NAMES)}, all or none")
    return ",".join(n for n in METRIC_NAMES if n in names)


def build_parser():
    d = Config()
    p = argparse.ArgumentParser(
        description="Non-Synergistic VAE (Barrientos & Sootla, 2018) and baselines on dSprites.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--metric", choices=METRICS, default=d.metric,
        help="experiment: Test_gt = Non-Syn VAE with traversals and ground-truth plots; test = "
             "Non-Syn VAE with live visdom plots; VAE; BVAE (beta-VAE); Factor (FactorVAE)")
    add("--update", choices=UPDATES, default=d.update,
        help="Non-Syn update: two-step = Adam on recon+KL then Adam on the synergy gradient taken "
             "at the same parameters (the original); joint = one step on recon+KL+alpha*syn")
    add("--sample", choices=SAMPLES, default=d.sample,
        help="compute the synergy term on the training batch (no_sample) or a second batch")
    add("--z_dim", type=_number(int, 1), default=d.z_dim, help="latent dimensions")
    add("--alpha", type=_number(float, 0), default=d.alpha, help="synergy penalty weight")
    add("--omega", type=_number(float, 0, 1, low_open=True), default=d.omega,
        help="greedy policy threshold, 0 < omega <= 1")
    add("--gamma", type=_number(float, 0), default=d.gamma, help="FactorVAE TC weight")
    add("--beta", type=_number(float, 0), default=d.beta, help="beta-VAE KL weight (--metric BVAE)")
    add("--lr_VAE", type=_number(float, 0, low_open=True), default=d.lr_VAE, help="VAE Adam lr")
    add("--beta1_VAE", type=_number(float, 0, 1), default=d.beta1_VAE, help="VAE Adam beta1")
    add("--beta2_VAE", type=_number(float, 0, 1), default=d.beta2_VAE, help="VAE Adam beta2")
    add("--lr_D", type=_number(float, 0, low_open=True), default=d.lr_D,
        help="discriminator Adam lr (Factor)")
    add("--beta1_D", type=_number(float, 0, 1), default=d.beta1_D, help="discriminator Adam beta1")
    add("--beta2_D", type=_number(float, 0, 1), default=d.beta2_D, help="discriminator Adam beta2")
    add("--batch_size", type=_number(int, 2), default=d.batch_size, help="batch size")
    add("--steps", type=_number(int, 1), default=d.steps,
        help="optimisation steps, exactly (150000 or 1.5e5)")
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
    add("--output_dir", default=d.output_dir, help="parent folder of run folders")
    add("--run-name", dest="run_name", default=d.run_name,
        help="run folder name (default: metric, alpha, omega, seed and a timestamp)")
    add("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    add("--no-cuda", dest="cuda", action="store_false", help="train on the CPU even with a GPU")
    add("--nb-test", dest="nb_test", type=_number(int, 1), default=d.nb_test,
        help="test images, and traversal points per latent")
    add("--seed", type=_number(int, 0), default=d.seed, help="random seed")
    add("--log-interval", dest="log_interval", type=_number(int, 1), default=d.log_interval,
        help="steps between log lines and metrics.jsonl records")
    add("--save-interval", dest="save_interval", type=_number(int, 1), default=d.save_interval,
        help="steps between traversal images and checkpoints")
    add("--gt-interval", dest="gt_interval", type=_number(int, 1), default=d.gt_interval,
        help="steps between ground-truth mean-activation plots")
    add("--eval-metrics", dest="eval_metrics", type=metric_list, default=d.eval_metrics,
        help="disentanglement metrics computed at every --gt-interval and at the end "
             f"(comma-separated from {', '.join(METRIC_NAMES)}; or all, none)")
    add("--viz_on", type=_bool, default=d.viz_on, help="stream losses to visdom (True/False)")
    add("--viz_port", type=_number(int, 1, 65535), default=d.viz_port, help="visdom port")
    add("--viz_il_iter", type=_number(int, 1), default=d.viz_il_iter,
        help="steps between values gathered for visdom")
    add("--viz_la_iter", type=_number(int, 1), default=d.viz_la_iter,
        help="steps between pushes to visdom")
    return p


def explicit_flags(parser, argv):
    """Names of the settings given on the command line (not defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest)
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kwargs.update(action="store_const", const=action.const)
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def make_config(args):
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in vars(args).items() if k in fields})
    if config.metric == "test":
        config = dataclasses.replace(config, viz_on=True)
    return config


def new_run_dir(config):
    name = config.run_name or (f"{config.metric}_alpha{config.alpha}_omega{config.omega}_"
                               f"seed{config.seed}_{datetime.now():%Y%m%d-%H%M%S}")
    parent = Path(config.output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --output_dir {parent}: {err.strerror or err}; "
                          f"choose a writable folder") from err
    run_dir = parent / name
    if config.run_name is None:  # a generated name never collides with an earlier run
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = parent / f"{name}_{suffix}"
    elif run_dir.exists():
        raise ConfigError(f"run folder {run_dir} already exists and is never overwritten; "
                          f"use --resume {run_dir} to continue it, or another --run-name")
    try:
        run_dir.mkdir()
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    except OSError as err:
        raise ConfigError(f"cannot write the run folder {run_dir}: {err.strerror or err}; "
                          f"choose a writable --output_dir") from err
    return run_dir


def load_checkpoint(run_dir):
    """The checkpoint of the run in ``run_dir`` (tensors and plain values only)."""
    import torch
    from solver import CHECKPOINT

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def stored_config(checkpoint, **changes):
    """The Config a checkpoint was trained with, for re-use outside training (visdom off)."""
    return Config(**{**checkpoint["config"], "viz_on": False, **changes})


def resume_state(run_dir, args, given):
    """Config and checkpoint of the run in ``run_dir``; flags given now may change RESUMABLE
    settings only."""
    checkpoint = load_checkpoint(run_dir)
    stored = checkpoint["config"]
    changes = {k: getattr(args, k) for k in given if k in stored}
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE and v != stored[k]}
    if fixed:
        raise ConfigError(f"--resume keeps the run's settings; cannot change "
                          f"{', '.join('--' + k for k in sorted(fixed))} (only "
                          f"{', '.join('--' + k for k in RESUMABLE)} may change)")
    config = Config(**{**stored, **changes})
    if config.steps <= checkpoint["step"]:
        raise ConfigError(f"the run in {run_dir} is already at step {checkpoint['step']}; pass "
                          f"--steps N with N > {checkpoint['step']} to train further")
    return config, checkpoint, {k: v for k, v in changes.items() if v != stored[k]}


def record_resume(run_dir, step, changed):
    """Append this resumption (step, changed settings) to the run's config.json."""
    from utils import write_json

    path = Path(run_dir) / "config.json"
    metadata = json.loads(path.read_text()) if path.exists() else {}
    metadata.setdefault("resumes", []).append(
        dict(step=step, changed=changed, at=datetime.now().isoformat(timespec="seconds")))
    write_json(path, metadata)


def trim_metrics(run_dir, step):
    """Drop metrics.jsonl records written after the checkpoint; the resumed run rewrites them."""
    from utils import atomic_write_bytes

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        log.warning("metrics.jsonl: %d records after the checkpoint (step %d) will be recomputed",
                    len(lines) - len(kept), step)
        atomic_write_bytes(path, "".join(kept).encode())


def main(argv=None):
    """Parse ``argv`` (default sys.argv[1:]), train, and return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    from dataset import CELEBA_SOURCE, CELEBA_ZIP, DatasetError, download_dsprites
    from solver import Solver, run_metadata
    from utils import write_json

    try:
        if args.resume:
            config, checkpoint, changed = resume_state(args.resume, args,
                                                       explicit_flags(parser, argv))
            run_dir = Path(args.resume)
            trim_metrics(run_dir, checkpoint["step"])
            record_resume(run_dir, checkpoint["step"], changed)
            log.info("Resuming %s at step %d of %d", run_dir, checkpoint["step"], config.steps)
        else:
            config, checkpoint = make_config(args), None
            if args.download and config.dataset != "dsprites":
                raise ConfigError("--download is only offered for dSprites. CelebA's Google Drive "
                                  f"downloads fail too often: get {CELEBA_ZIP} from {CELEBA_SOURCE} "
                                  "and put it in --data-dir")
            if args.download:
                download_dsprites(config.data_dir or "datasets")
            run_dir = new_run_dir(config)
            log.info("Run folder: %s", run_dir)
        solver = Solver(config, run_dir, checkpoint)
        if checkpoint is None:
            write_json(run_dir / "config.json", run_metadata(config, solver.data))
        finished = solver.train()
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if finished else 130


if __name__ == "__main__":
    sys.exit(main())
