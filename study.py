"""Many runs as one command: a grid of trials (objectives x seeds x alpha x omega x ...), each an
ordinary run folder made by run.py, run side by side on this machine or on a Ray cluster, then
one summary.

    python study.py --out DIR [--metric Test_gt Factor VAE BVAE] [--seeds N | --seed 1 2 3]
                    [--alpha ...] [--omega ...] [--gamma ...] [--beta ...] [--spec FILE.json]
                    [--preset thesis|figures|evidence|field] [--retries 2] [--extend]
                    [--import-finished RUNS_DIR]   (trials finished on another machine)
                    [--import-unfinished CARRY_DIR]   (trials stopped on another machine)
                    [--engine local] [--workers W] [--threads T] [--trials-per-gpu K]
                    [--engine ray] [--address auto|HOST:PORT] [--cpus-per-trial C]
                    [--gpus-per-trial G]
                    [-- run.py flags shared by every trial]
    python study.py --out DIR --summary

Axes that do not apply to an objective (alpha and omega for VAE, gamma for Non-Syn) do not
multiply its trials. DIR/study.json records the spec, the trials and each trial's state; running
the same command again skips finished trials, resumes interrupted ones from their checkpoints
and retries failed ones (at most --retries times). A different spec for an existing DIR is
refused (``--extend`` may add axis values or seeds). Written at the end of every invocation:
summary.md / summary.csv (per configuration: finished seeds, mean ± std of recon, KL, ELBO and
i_max over the final evaluation's fixed sample, and of the scores), ttests.csv (Welch's t-test
of every objective against Non-Syn VAE; without it, between configurations of different
objectives) and curves.png (recon, KL and i_max of the
training log against the step, mean ± std band per configuration).
"""
import argparse
import csv
import ctypes
import fcntl
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


from config import (ARCHS, NONSYN, OBJECTIVE_SETTINGS, OBJECTIVES, RESUMABLE, Config,
                    build_parser, explicit_flags, new_run_config, objective_label)
from evidence import mean_std, mean_std_text
from metrics import METRIC_LABELS, UDR_PROTOCOL, score_note, udr
from precision import PRECISIONS
from representation import MEASURE_LABELS, SAMPLE_MEASURES, udr_inputs
from runfolder import RunFolder, stored_run
from utils import (ArgumentParser, ConfigError, DiskFull, atomic_write_bytes, check_writable,
                   progress, usable_cpus, write_json)

ROOT = Path(__file__).resolve().parent
OBJECTIVE_AXES = OBJECTIVE_SETTINGS  # the value axes that multiply each objective's trials
VALUE_AXES = ("alpha", "omega", "gamma", "beta", "lambda_od", "lambda_d_factor", "c_max")
CHOICE_AXES = {"precision": PRECISIONS, "arch": ARCHS}  # axes of every objective, their values
CHOICE_NAMES = {"precision": "{}", "arch": "arch{}"}  # in trial names: _bf16, _arch2018
AXES = VALUE_AXES + tuple(CHOICE_AXES)
PRESETS = {
    # the thesis comparison: the original README's settings
    "thesis": dict(metric=["Test_gt", "Factor", "VAE", "BVAE"], alpha=[5.0], omega=[0.9],
                   gamma=[6.4], beta=[4.0],
                   flags=["--steps", "150000", "--gt-interval", "5000"]),
    # the runs of the thesis figures (REFERENCE: traversals.gif, latents.png, plots.png with the
    # 2018 decoder; VAE_traversals.png with the 2020 one): 110,000 steps, a traversal every
    # 2,000, the ground truth every 5,000, 20-step records for the loss plot; `-- --steps N`
    # shortens them
    "figures": dict(metric=["Test_gt", "Factor", "VAE"], alpha=[5.0], omega=[0.9], gamma=[6.4],
                    arch={"Test_gt": ["2018"], "Factor": ["2018"], "VAE": ["2020"]},
                    flags=["--steps", "110000", "--gt-interval", "5000", "--save-interval",
                           "2000", "--log-interval", "20"]),
    # Non-Syn VAE beside the field's objectives (disentanglement_lib's settings), every one
    # against Non-Syn in the t-tests; seeds from --seeds / --seed
    "field": dict(metric=["Test_gt", "BVAE", "Factor", "BTCVAE", "DIPVAE1", "DIPVAE2",
                          "AnnealedVAE", "VAE"],
                  alpha=[5.0], omega=[0.9], gamma=[6.4, 10.0], lambda_od=[10.0], c_max=[25.0],
                  beta={"BVAE": [4.0], "BTCVAE": [6.0]}),
    # the thesis's claims over five seeds (the figures preset's runs, bf16): seeds 2-5 to
    # 50,000 steps with the ground truth and scores every 5,000, a traversal every 10,000, a
    # record every 100; seed 1 to the thesis's 110,000 with the figures' traversal every 2,000
    # and 20-step records, its 50,000-step checkpoint kept (evaluate.py --step 50000 scores it
    # as the other seeds' final ones are). Trials run in this order: Non-Syn VAE and FactorVAE
    # seeds 2-5, the VAE's, then seed 1's three
    "evidence": dict(metric=["Test_gt", "Factor", "VAE"], alpha=[5.0], omega=[0.9],
                     gamma=[6.4], precision=["bf16"],
                     arch={"Test_gt": ["2018"], "Factor": ["2018"], "VAE": ["2020"]},
                     seed=[2, 3, 4, 5, 1],
                     flags=["--steps", "50000", "--gt-interval", "5000", "--save-interval",
                            "10000", "--log-interval", "100"],
                     seed_flags={"1": ["--steps", "110000", "--save-interval", "2000",
                                       "--log-interval", "20", "--keep-interval", "50000"]}),
}
STATES = ("pending", "running", "finished", "failed")
MEASURE_OMEGA = Config.measure_omega  # the default; an i_max at another omega gets its own column
CURVES = (("recon", "reconstruction loss"), ("kl", "KL divergence"),
          ("i_max", "I_max: KL of the worst set"))  # per-step training log, every objective
RAY_INSTALL = "pip install -r requirements-ray.txt"
EXIT_MEANINGS = {2: "bad settings or data", 3: "diverged, disk full or out of memory",
                 130: "interrupted"}


class StudyError(ValueError):
    """The study's spec or folder is unusable; the message says what to do."""


# --- the grid ------------------------------------------------------------------------------------

def trial_name(metric, settings, seed):
    """Deterministic folder name of a trial from its settings, e.g. Test_gt_alpha5.0_omega0.9_seed1
    (an axis left at run.py's default does not appear)."""
    parts = [metric] + [f"{axis}{settings[axis]!r}" for axis in OBJECTIVE_AXES[metric]
                        if axis in settings]
    parts += [CHOICE_NAMES[axis].format(settings[axis]) for axis in CHOICE_AXES
              if axis in settings]  # e.g. _bf16, _arch2018
    return "_".join(parts + [f"seed{seed}"])


def axis_values(spec, axis, metric):
    """The values of ``axis`` for ``metric``'s trials: a spec gives an axis as a list (every
    objective) or as {objective: list} (e.g. "arch": {"VAE": ["2020"], "Test_gt": ["2018"]});
    None where it gives none."""
    values = spec.get(axis)
    return values.get(metric) if isinstance(values, dict) else values


def seed_groups(spec):
    """The spec's seeds in groups that share their run.py flags (the seeds without
    ``seed_flags`` of their own first, then each seed that has them), in the spec's order."""
    own = spec.get("seed_flags", {})
    plain = [s for s in spec["seed"] if str(s) not in own]
    return ([plain] if plain else []) + [[s] for s in spec["seed"] if str(s) in own]


def expand(spec):
    """The trials of a spec: [{name, metric, seed, settings}] in a fixed order: per group of
    seeds (seed_groups), objective by objective, then axis values, then seeds."""
    trials = []
    for seeds in seed_groups(spec):
        for metric in spec["metric"]:
            axes = OBJECTIVE_AXES[metric] + tuple(CHOICE_AXES)
            values = [axis_values(spec, axis, metric) or [None] for axis in axes]
            for combo in itertools.product(*values):
                settings = {a: v for a, v in zip(axes, combo, strict=True) if v is not None}
                for seed in seeds:
                    trials.append(dict(name=trial_name(metric, settings, seed), metric=metric,
                                       seed=seed, settings=settings))
    return trials


def trial_flags(spec, seed):
    """The run.py flags every trial of ``seed`` shares: the spec's, then the seed's own (its
    ``seed_flags`` entry, which ends with the shared flags after ``--`` so that they win)."""
    return list(spec["flags"]) + list(spec.get("seed_flags", {}).get(str(seed), []))


def trial_argv(spec, trial, out):
    """run.py's argv for a new trial."""
    argv = trial_flags(spec, trial["seed"]) + ["--metric", trial["metric"], "--seed",
                                               str(trial["seed"])]
    for axis, value in trial["settings"].items():
        argv += [f"--{axis}", value if axis in CHOICE_AXES else repr(value)]
    return argv + ["--output_dir", str(out), "--run-name", trial["name"]]


def configuration(trial):
    """The configuration a trial belongs to (its objective and axis values, not its seed)."""
    return trial["metric"], tuple(sorted(trial["settings"].items()))


# --- the command line ----------------------------------------------------------------------------

def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = []
    if "--" in argv:
        cut = argv.index("--")
        argv, shared = argv[:cut], argv[cut + 1:]
    p = ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the study folder")
    grid = p.add_argument_group("the grid")
    grid.add_argument("--metric", nargs="+", choices=tuple(OBJECTIVE_AXES), help="objectives")
    seeds = grid.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, help="seeds 1..N")
    seeds.add_argument("--seed", nargs="+", type=int, help="these seeds")
    for axis in VALUE_AXES:
        grid.add_argument(f"--{axis}", nargs="+", type=float, help=f"{axis} values")
    for axis, choices in CHOICE_AXES.items():
        grid.add_argument(f"--{axis}", nargs="+", choices=choices,
                          help=f"{axis} of every objective's trials")
    grid.add_argument("--spec", help="a JSON file with the same keys (metric, seed, alpha, ..., "
                                     "flags)")
    grid.add_argument("--preset", choices=tuple(PRESETS),
                      help="thesis: the thesis comparison; figures: the runs of the thesis "
                           "figures (python figures.py --study DIR draws them); evidence: the "
                           "figures' runs over seeds 1-5 (seeds 2-5 to 50,000 steps, seed 1 to "
                           "110,000); field: Non-Syn VAE beside beta-VAE, FactorVAE, "
                           "beta-TCVAE, DIP-VAE-I/II, AnnealedVAE and VAE")
    grid.add_argument("--extend", action="store_true",
                      help="add axis values or seeds to DIR's study")
    grid.add_argument("--import-finished", metavar="RUNS_DIR",
                      help="take the trials that have no folder in --out yet and that finished "
                           "elsewhere from RUNS_DIR/<trial name> (the runs/ that 'figures.py "
                           "--evidence STUDY --records-only' exported, e.g. misc/runs: records, "
                           "ground-truth summaries, final weights) instead of training them: a "
                           "study carried to a new machine")
    grid.add_argument("--import-unfinished", metavar="CARRY_DIR",
                      help="take the trials that have no folder in --out yet, and were not "
                           "imported finished, from CARRY_DIR/<trial name> where 'figures.py "
                           "--evidence STUDY --carry CARRY_DIR' banked them stopped (records, "
                           "images, checkpoints): they resume here from the step they reached "
                           "elsewhere")
    grid.add_argument("--retries", type=int, default=2, help="retries of a failed trial")
    grid.add_argument("--summary", action="store_true",
                      help="only write the summary of DIR (from the run folders if study.json "
                           "is unreadable)")
    grid.add_argument("--rebuild", action="store_true",
                      help="set DIR/study.json aside (kept) and adopt the spec given now: "
                           "every trial's state from its run folder, which must hold that "
                           "trial's settings; a readable study.json's attempts and failure "
                           "reasons carry over")
    local = p.add_argument_group("--engine local (default): worker processes on this machine")
    local.add_argument("--engine", choices=("local", "ray"), default="local")
    local.add_argument("--workers", type=int, default=None,
                       help="trials run side by side (default: cores / threads, or GPUs x "
                            "--trials-per-gpu)")
    local.add_argument("--threads", type=int, default=None,
                       help="torch/BLAS threads per trial (default: 1, or cores / workers). On 2 "
                            "cores 2 workers x 1 thread finished two trials 15-19 %% sooner "
                            "than 1 x 2 on an AMX Xeon; on a 2-core EPYC 1 x 2 trained "
                            "15-30 %% more steps per hour")
    local.add_argument("--trials-per-gpu", type=int, default=None,
                       help="trials packed on each visible GPU (default 1 when there are GPUs)")
    ray = p.add_argument_group(f"--engine ray: Ray Tune trials (needs: {RAY_INSTALL})")
    ray.add_argument("--address", default=None,
                     help="a running Ray cluster (auto or HOST:PORT); default: start a local "
                          "instance with this machine's cores")
    ray.add_argument("--cpus-per-trial", type=float, default=1.0,
                     help="Ray resources of a trial; also its torch threads (rounded down, at "
                          "least 1)")
    ray.add_argument("--gpus-per-trial", type=float, default=0.0,
                     help="fractions pack trials on a GPU: 0.25 runs four per GPU")
    args = p.parse_args(argv)
    return p, args, shared


# run.py settings a study sets itself or that would make a trial something else than its name
# and the summary say: refused among the shared flags in any spelling run.py accepts
OWNED = ("metric", "seed", "output_dir", "run_name", "resume", "dry_run", "help", *AXES)


def owned_flags(flags):
    """The run.py settings among ``flags`` (a spec's or those after --) that the study owns, as
    run.py would read them: abbreviations (--alph) and either spelling resolved."""
    return sorted(explicit_flags(build_parser(), flags, with_help=True) & set(OWNED))


def refuse(message):
    """A spec's mistake: one line naming it, exit 2, before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def make_spec(p, args, shared):
    spec = dict(PRESETS[args.preset]) if args.preset else {}
    if args.spec:
        try:
            loaded = json.loads(Path(args.spec).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            refuse(f"--spec {args.spec}: {err}")
        if not isinstance(loaded, dict):
            refuse(f"--spec {args.spec} must hold one JSON object ({{\"metric\": [...], "
                    f"\"seed\": [...], ...}}), not a {type(loaded).__name__}")
        spec.update(loaded)
    for key in ("metric", *AXES):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.preset and args.metric is not None:  # a preset narrowed to some of its objectives
        for axis, values in spec.items():  # keeps its per-objective values for those only
            if isinstance(values, dict) and values is PRESETS[args.preset].get(axis):
                spec[axis] = {m: v for m, v in values.items() if m in spec["metric"]}
    if args.seeds is not None:
        spec["seed"] = list(range(1, args.seeds + 1))
    elif args.seed is not None:
        spec["seed"] = args.seed
    spec.setdefault("seed", [1])
    flags = spec.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        refuse(f"flags must be a list of run.py's command-line words, e.g. [\"--steps\", "
                f"\"3000\"], not {flags!r}")
    spec["flags"] = flags + shared
    unknown = sorted(set(spec) - {"metric", "seed", "flags", "seed_flags", *AXES})
    if unknown:
        refuse(f"unknown axis {', '.join(unknown)}; axes are metric, seed, {', '.join(AXES)} "
               f"(and flags, seed_flags)")
    if not spec.get("metric"):
        refuse("no objective: give --metric (or --preset, --spec)")
    for key in ("metric", "seed"):
        if not isinstance(spec[key], list):
            refuse(f"axis {key} must be a list of values, not {spec[key]!r}")
        if not spec[key]:
            refuse(f"axis {key} is empty: give at least one value")
    bad = [m for m in spec["metric"] if m not in OBJECTIVE_AXES]
    if bad:
        refuse(f"unknown objective {', '.join(map(str, bad))}; choose from "
                f"{', '.join(OBJECTIVE_AXES)}")
    for i, metric in enumerate(spec["metric"]):  # e.g. BVAE and BVAE_gt: one objective twice
        if alias := next((m for m in spec["metric"][:i] if m != metric
                          and OBJECTIVES[m].step is OBJECTIVES[metric].step), None):
            refuse(f"--metric {alias} and {metric} are the same objective "
                   f"({OBJECTIVES[metric].name}) under two names; give one")
    if bad := [s for s in spec["seed"] if isinstance(s, bool) or not isinstance(s, int)
               or s < 0]:
        refuse(f"axis seed: {bad[0]!r} is not a seed (a whole number >= 0)")
    for axis in AXES:
        if axis not in spec:
            continue
        per_objective = spec[axis] if isinstance(spec[axis], dict) else {None: spec[axis]}
        for metric, values in per_objective.items():
            where = f"axis {axis}" + (f" for {metric}" if metric else "")
            if metric is not None and metric not in spec["metric"]:
                refuse(f"{where}: {metric} is not among the study's objectives "
                        f"({', '.join(spec['metric'])})")
            if not isinstance(values, list):
                refuse(f"{where} must be a list of values (or, in a spec file, "
                        f"{{objective: list}}), not {values!r}")
            if not values:
                refuse(f"{where} is empty: give at least one value")
            if axis in CHOICE_AXES:
                if bad := [v for v in values if v not in CHOICE_AXES[axis]]:
                    refuse(f"{where}: {bad[0]!r} is not one of {', '.join(CHOICE_AXES[axis])}")
            elif bad := [v for v in values if isinstance(v, bool)
                         or not isinstance(v, (int, float))]:
                refuse(f"{where}: {bad[0]!r} is not a number")
    for key in ("metric", "seed", *AXES):
        per_objective = spec.get(key, [])
        for values in (per_objective.values() if isinstance(per_objective, dict)
                       else [per_objective]):
            if dupes := sorted({str(v) for v in values if values.count(v) > 1}):
                refuse(f"axis {key} lists {', '.join(dupes)} more than once: each value makes "
                        f"its own trials, give it once")
    if "seed_flags" in spec:
        from_preset = args.preset and spec["seed_flags"] is PRESETS[args.preset].get("seed_flags")
        spec["seed_flags"] = checked_seed_flags(spec, shared, from_preset)
        if not spec["seed_flags"]:
            del spec["seed_flags"]
    for flags in [spec["flags"]] + [trial_flags(spec, seed) for seed in spec["seed"]]:
        try:
            clash = owned_flags(flags)
        except ConfigError as err:
            refuse(f"run.py flags {' '.join(flags)!r}: {err}")
        if clash:
            name = clash[0]
            refuse(f"run.py flag --{name} (as run.py reads {' '.join(flags)!r}) is "
                    + ("an axis of the study: give it as one (--" + name + " ...)"
                       if name in AXES or name in ("metric", "seed")
                       else "set by the study itself for every trial"))
    return {k: spec[k] for k in ("metric", "seed", *AXES, "flags", "seed_flags") if k in spec}


def checked_seed_flags(spec, shared, from_preset):
    """A spec's ``seed_flags`` ({"1": ["--steps", "110000"]}: run.py flags for that seed's
    trials only, after the spec's flags), each entry ending with the shared flags after ``--``
    so that those still win. A preset's entries for seeds the study does not run are dropped;
    a spec file's are refused."""
    given = spec["seed_flags"]
    if not isinstance(given, dict):
        refuse(f"seed_flags must be {{seed: [run.py flags]}}, e.g. {{\"1\": [\"--steps\", "
               f"\"110000\"]}}, not {given!r}")
    seeds = {str(s) for s in spec["seed"]}
    checked = {}
    for seed, flags in given.items():
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            refuse(f"seed_flags for seed {seed} must be a list of run.py's command-line words, "
                   f"e.g. [\"--steps\", \"110000\"], not {flags!r}")
        if str(seed) not in seeds:
            if from_preset:
                continue
            refuse(f"seed_flags names seed {seed}, which is not among the study's seeds "
                   f"({', '.join(map(str, spec['seed']))})")
        checked[str(seed)] = flags + shared
    return checked


# Settings a trial's folder may hold otherwise than its flags resolve now: where it was written
# from; nor are those a resume may change compared, but for the steps.
UNCOMPARED = ("output_dir", "run_name")


def other_run(folder, trial, configs):
    """How the run in ``folder`` differs from ``trial`` (a few settings: config.json's, older
    runs' with the values their format implies, against those the trial's flags resolve to),
    "it is a symbolic link", or None when it is that trial's run or not started yet."""
    try:
        stored = folder.settings()
    except ConfigError as err:
        raise StudyError(f"trial {trial['name']}: {err}") from None
    if stored is None:
        return None  # not started yet, or stopped before it wrote its settings
    expected = configs[trial["name"]]
    differ = [k for k, v in expected.items() if k not in UNCOMPARED and stored.get(k) != v
              and (k not in RESUMABLE or k == "steps")]
    if differ or folder.path.is_symlink():
        return ", ".join(f"{k} {stored.get(k)!r} (the trial's: {expected[k]!r})"
                         for k in differ[:4]) or "it is a symbolic link"
    return None


def check_trial_folders(out, trials, configs):
    """Refuse (StudyError, one line) a trial whose folder holds another run (``other_run``),
    e.g. a folder replaced by (a link to) another objective's run."""
    for trial in trials:
        folder = RunFolder(Path(out) / trial["name"])
        if what := other_run(folder, trial, configs):
            raise StudyError(f"trial {trial['name']}: its folder {folder} holds another run "
                             f"({what}); it is not this trial's run. Move it out of the study "
                             f"folder and run the same command again")


def importable(out, trials, configs, source):
    """The finished runs that ``--import-finished SOURCE`` takes for trials that have no run
    folder in ``out`` yet: SOURCE/<trial name> as figures.py exports a finished run (records,
    ground-truth summaries, final weights: ``RunFolder.holds_finished_export``), checked to be
    that trial's run (StudyError otherwise, before anything is written). A folder there that
    is not a finished run's export, or holds the trial's run at another --steps (misc/runs'
    50,000-step figures runs beside a 110,000-step trial), is named on stderr; that trial
    trains here."""
    source = Path(source)
    if not source.is_dir():
        raise StudyError(f"--import-finished {source}: no such folder (give the runs/ folder "
                         f"that 'figures.py --evidence STUDY --records-only' wrote, e.g. "
                         f"misc/runs)")
    found = []
    for trial in trials:
        origin = RunFolder(source / trial["name"])
        if (Path(out) / trial["name"]).exists() or not origin.path.is_dir():
            continue
        what = other_run(origin, trial, configs)
        steps = (origin.settings() or {}).get("steps")
        if what and not other_run(origin, trial, {trial["name"]: {**configs[trial["name"]],
                                                                  "steps": steps}}):
            print(f"study.py: {origin} is this trial's run trained for {steps} steps, not "
                  f"{configs[trial['name']]['steps']}; trial {trial['name']} trains here",
                  file=sys.stderr)
            continue
        if what:
            raise StudyError(f"--import-finished: {origin} holds another run than trial "
                             f"{trial['name']} ({what}); nothing was imported. Remove it from "
                             f"{source} or leave out --import-finished")
        if not origin.holds_finished_export():
            print(f"study.py: {origin} is not a finished run's export (config.json, metrics.jsonl "
                  f"with the last step's records, final weights model.pt); trial "
                  f"{trial['name']} trains here", file=sys.stderr)
            continue
        found.append((trial["name"], origin))
    return found


def resumable_imports(out, trials, configs, source, taken):
    """The stopped, unfinished runs that ``--import-unfinished SOURCE`` takes for trials that
    have no run folder in ``out`` yet and none among ``taken`` (finished imports win):
    SOURCE/<trial name> as 'figures.py --evidence STUDY --carry SOURCE' banked it, checked to be
    that trial's run (StudyError otherwise, before anything is written) with a checkpoint that
    passes every check of a resume (a damaged one is named on stderr; that trial trains here).
    The study then resumes each from its checkpoint's step."""
    source = Path(source)
    if not source.is_dir():
        raise StudyError(f"--import-unfinished {source}: no such folder (give the folder that "
                         f"'figures.py --evidence STUDY --carry DIR' banked the stopped trials "
                         f"in)")
    found = []
    for trial in trials:
        origin = RunFolder(source / trial["name"])
        if ((Path(out) / trial["name"]).exists() or not origin.path.is_dir()
                or trial["name"] in taken):
            if trial["name"] in taken and origin.path.is_dir():
                print(f"study.py: {origin} is superseded: trial {trial['name']} was taken "
                      f"finished from --import-finished", file=sys.stderr)
            continue
        if what := other_run(origin, trial, configs):
            raise StudyError(f"--import-unfinished: {origin} holds another run than trial "
                             f"{trial['name']} ({what}); nothing was imported. Remove it from "
                             f"{source} or leave out --import-unfinished")
        try:
            step = stored_run(origin)[0]["step"]
        except ConfigError as err:
            print(f"study.py: {origin} cannot be resumed ({err}); trial {trial['name']} trains "
                  f"here", file=sys.stderr)
            continue
        found.append((trial["name"], origin, f"stopped at step {step:,} on another machine; "
                                             f"resumed here from its checkpoint"))
    return found


FINISHED_NOTE = "finished on another machine; records and final weights, no checkpoint"


def take_imports(out, found):
    """Copy each of the runs ``importable`` or ``resumable_imports`` found, (name, origin) or
    (name, origin, note), into its trial's folder (whole or not at all: through a temporary
    folder renamed into place; a banked run's checkpoints/ too), unless that folder appeared
    meanwhile; a file imported.json in it says where it came from. Returns the names taken."""
    taken = []
    for name, origin, *note in found:
        target = Path(out) / name
        if target.exists():
            continue
        work = Path(tempfile.mkdtemp(prefix=f".{name}.import-", suffix=".tmp", dir=out))
        try:
            shutil.copytree(origin.path, work, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".*"))
            (work / RunFolder.IMPORTED).write_text(json.dumps(dict(
                imported_from=str(origin.path.resolve()), at=time.strftime("%Y-%m-%d %H:%M:%S"),
                note=note[0] if note else FINISHED_NOTE), indent=2) + "\n")
            os.rename(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        taken.append(name)
    return taken


def check_trials(spec, trials, out):
    """Every trial's settings, checked as ``run.py --dry-run`` checks them (run.new_run_config,
    here in this process) before any trial starts; returns {name: resolved settings}."""
    settings = {}
    for trial in trials:
        try:
            config = new_run_config(trial_argv(spec, trial, out))
        except ConfigError as err:
            raise StudyError(f"trial {trial['name']} would be refused by run.py: {err}") from None
        settings[trial["name"]] = json.loads(json.dumps(config.to_dict()))  # as stored
    return settings


MIN_RECORDS = 10  # training records per run below which curves.png shows next to nothing


def scale_records(spec, study, preset):
    """(spec, {trial: resolved settings}): a study whose runs would log fewer than MIN_RECORDS
    training records at the default --log-interval logs more often, said in one line (the
    interval joins the spec's flags, so the same command resumes the same study); an explicit
    --log-interval is kept, with a warning naming the flag. A study recorded before this rule
    keeps its spec."""
    trials = expand(spec)
    configs = check_trials(spec, trials, study.out)
    few = [c for c in configs.values() if c["steps"] // c["log_interval"] < MIN_RECORDS]
    if not few:
        return spec, configs
    steps = min(c["steps"] for c in few)
    interval = max(1, steps // MIN_RECORDS)
    given = sorted({c["log_interval"] for c in few})
    logged = steps // max(given)
    command = f"--preset {preset} " if preset else ""
    if any(g != Config.log_interval for g in given) or (
            study.data is not None and study.data.get("spec") == spec):
        print(f"warning: {len(few)} of {len(configs)} trials will log {logged} training "
              f"record(s) (--steps {steps}, --log-interval {max(given)}): curves.png will show "
              f"next to nothing; add -- --log-interval {interval} for {steps // interval}",
              file=sys.stderr)
        return spec, configs
    spec = dict(spec, flags=list(spec["flags"]) + ["--log-interval", str(interval)])
    print(f"study.py: {command}--steps {steps} at the default --log-interval "
          f"{Config.log_interval} would log {logged} training record(s) per run; logging every "
          f"{interval} steps instead ({steps // interval} records; -- --log-interval N sets it)",
          file=sys.stderr)
    return spec, check_trials(spec, trials, study.out)


@dataclass
class Plan:
    """How the local engine places trials: ``workers`` side by side, ``threads`` each, and the
    GPU (a CUDA_VISIBLE_DEVICES entry, or None for the CPU) of each worker slot."""
    workers: int
    threads: int
    devices: list


def visible_gpus():
    """The GPUs trials may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch
    count = torch.cuda.device_count()
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def plan_local(cores, gpus, workers=None, threads=None, per_gpu=None, cuda=True):
    """The local engine's placement; StudyError for one that oversubscribes the machine."""
    for name, value in (("--workers", workers), ("--threads", threads),
                        ("--trials-per-gpu", per_gpu)):
        if value is not None and value < 1:
            raise StudyError(f"{name} must be at least 1")
    if per_gpu is not None and not (gpus and cuda):
        raise StudyError("--trials-per-gpu packs trials on GPUs, but " + (
            "the trials' flags say --no-cuda" if gpus else "no GPU is visible (torch sees none)"))
    if gpus and cuda:
        per_gpu = per_gpu or 1
        slots = [gpu for gpu in gpus for _ in range(per_gpu)]
        workers = workers or len(slots)
        if workers > len(slots):
            raise StudyError(f"--workers {workers} exceeds {len(gpus)} GPU(s) x --trials-per-gpu "
                             f"{per_gpu}; raise --trials-per-gpu to pack more trials per GPU")
        threads = threads or max(1, cores // workers)
        devices = slots[:workers]
    else:
        threads = threads or (max(1, cores // workers) if workers else 1)
        workers = workers or max(1, cores // threads)
        devices = [None] * workers
    if workers * threads > cores:
        raise StudyError(f"{workers} worker(s) x {threads} thread(s) exceed the {cores} CPUs this "
                         f"process may use (its affinity mask and CPU quota): "
                         f"trials that oversubscribe the CPU slow each other down many times "
                         f"over")
    return Plan(workers, threads, devices)


# --- one trial: run.py in a child process --------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent():
    """In the trial's process before run.py starts: SIGTERM it (a checkpoint at its next step)
    when the process that started it dies, so that no orphan trial keeps the run folder's lock."""
    if _LIBC is not None:
        parent = os.getppid()
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


def trial_env(threads, device=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def launch(spec, trial, out, env, cwd=None):
    """Start the trial's run.py (``--resume`` from its checkpoint when it has one) in ``cwd``
    (default: here; relative paths among the flags mean what they meant to study.py); its
    output goes to DIR/.<name>.log."""
    folder = out / trial["name"]
    resume = RunFolder(folder).checkpoint_path.exists()
    with open(out / f".{trial['name']}.log", "ab") as log:  # the child holds its own copy
        if folder.is_dir() and not resume and not RunFolder(folder).holds_nothing():
            # stopped before its first checkpoint: start again, keeping what it wrote
            kept = out / f".{trial['name']}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}"
            folder.rename(kept)
            log.write(f"study.py: {folder} had no checkpoint to resume from; it was moved to "
                      f"{kept} and the trial starts again\n".encode())
        argv = ["--resume", str(folder)] if resume else trial_argv(spec, trial, out)
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                preexec_fn=_die_with_parent)


def log_tail(out, trial, lines=5):
    """The last lines of the trial's log, DIR/.<name>.log."""
    path = out / f".{trial['name']}.log"
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def exit_reason(code, tail):
    if code < 0:
        return f"run.py was killed by {signal.Signals(-code).name}"
    errors = [line for line in tail if line.startswith("error:")]
    meaning = EXIT_MEANINGS.get(code, "")
    return f"run.py exited with {code}" + (f" ({meaning})" if meaning else "") + (
        f": {errors[-1][len('error:'):].strip()}" if errors else "")


def complete(folder):
    """True when ``folder`` holds a run that trained all its steps."""
    return RunFolder(folder).is_complete()


def current_step(folder):
    """The last training step logged in ``folder`` (0 before the first record)."""
    return RunFolder(folder).last_logged_step()


# --- bookkeeping ---------------------------------------------------------------------------------

def study_json_problem(data):
    """What makes ``data`` (study.json's content) other than what Study.save writes, or None."""
    if not isinstance(data, dict) or not {"spec", "trials"} <= set(data):
        return "not an object with 'spec' and 'trials'"
    spec, trials = data["spec"], data["trials"]
    if not isinstance(spec, dict) or not isinstance(spec.get("metric"), list) or not \
            isinstance(spec.get("seed"), list) or not isinstance(spec.get("flags"), list):
        return "its spec lacks metric, seed or flags"
    seed_flags = spec.get("seed_flags", {})
    if not isinstance(seed_flags, dict) or not all(
            isinstance(f, list) and all(isinstance(w, str) for w in f)
            for f in seed_flags.values()):
        return "its seed_flags are not {seed: [run.py flags]}"
    if not isinstance(trials, list):
        return "its trials are not a list"
    for i, trial in enumerate(trials):
        if not isinstance(trial, dict) or not isinstance(trial.get("name"), str) or \
                trial.get("metric") not in OBJECTIVE_AXES or not isinstance(
                    trial.get("settings"), dict) or trial.get("state") not in STATES or \
                not isinstance(trial.get("attempts"), int):
            return f"trial {i} is not a trial record"
        if trial["name"] in ("", ".", "..") or "/" in trial["name"]:
            return f"trial {i} has the name {trial['name']!r}"
    try:
        if sorted(t["name"] for t in expand(spec)) != sorted(t["name"] for t in trials):
            return "its trials are not those of its spec"
    except (KeyError, TypeError, AttributeError) as err:
        return f"its spec does not expand ({type(err).__name__})"
    return None


def folder_trials(out):
    """The trials of the run folders in ``out`` (name, metric, seed, the objective's settings
    from each config.json; finished or pending from its checkpoint): what a summary reads when
    study.json is unreadable."""
    trials = []
    for path in sorted(Path(out).iterdir()) if Path(out).is_dir() else []:
        config = RunFolder(path).read_config().get("config") if path.is_dir() else None
        if not isinstance(config, dict) or config.get("metric") not in OBJECTIVE_AXES:
            continue
        settings = {axis: config[axis] for axis in OBJECTIVE_AXES[config["metric"]]
                    if axis in config}
        settings.update({axis: config[axis] for axis in CHOICE_AXES
                         if axis in config and config[axis] != getattr(Config, axis)})
        trials.append(dict(name=path.name, metric=config["metric"], seed=config.get("seed"),
                           settings=settings, attempts=0, reason=None, log_tail=None,
                           state="finished" if complete(path) else "pending"))
    return trials


class Study:
    """DIR/study.json: the spec, the trials and their states."""

    def __init__(self, out, read=True):
        self.out = Path(out)
        self.path = self.out / "study.json"
        self.data = self.read() if read else None

    def read(self):
        """study.json's content, checked: None when there is none; StudyError (one line, how
        to recover) when it is truncated, empty or edited into something this code did not
        write."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            problem = study_json_problem(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            raise StudyError(
                f"{self.path} is unreadable ({problem}): it was truncated or edited. The run "
                f"folders are intact: 'python study.py --out {self.out} --summary' still "
                f"summarises them, and the same study command with --rebuild re-derives every "
                f"trial's state from its run folder (the old file is kept beside it)")
        return data

    def rebuild(self):
        """Re-derive the trials' states from their run folders under the spec given now. The
        old study.json is set aside (study.json.replaced-<time>, or .unreadable-<time>; never
        deleted); a readable one's attempt counts and failure reasons carry over to the trials
        of the same name."""
        try:
            old = self.read()
        except StudyError:
            old = None
        if self.path.exists():
            kept = self._set_aside("replaced" if old is not None else "unreadable")
            print(f"study.py: {self.path} was set aside as {kept.name}; the trials' states "
                  f"come from their run folders" + (", their attempts and failure reasons from "
                                                     "it" if old is not None else ""),
                  file=sys.stderr)
        self.data = None if old is None else dict(spec=None, trials=[
            {k: t[k] for k in ("name", "attempts", "reason", "log_tail")}
            | dict(state="failed" if t["state"] == "failed" else "pending")
            for t in old["trials"]])

    def _set_aside(self, why):
        kept = self.path.with_name(f"study.json.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.path.rename(kept)
        return kept

    def nothing_trained(self):
        """True when no trial of the study in DIR has written a run folder (each failed at
        start-up, or none started): its spec may then be replaced by a corrected one."""
        return not any(RunFolder(self.out / t["name"]).has_config() for t in self.data["trials"])

    def check_spec(self, spec, extend):
        """Refuse a spec that would mix with the study already in DIR (``--extend`` may grow
        axes and seeds, nothing else; a study that trained nothing takes a corrected spec)."""
        if self.data is not None and self.data["spec"] != spec:
            old = self.data["spec"]
            grows = extend and all(trial_flags(old, s) == trial_flags(spec, s)
                                   for s in old["seed"]) and (
                {t["name"] for t in expand(old)} <= {t["name"] for t in expand(spec)})
            if not grows and not self.nothing_trained():
                raise StudyError(f"{self.out} holds a study with another spec ({self.path}); it is "
                                 f"never mixed or deleted: use another --out, the same spec, "
                                 f"--extend to add axis values or seeds, or --rebuild to adopt "
                                 f"this spec with the run folders whose settings match it")

    def adopt(self, spec):
        """Record ``spec`` and its trials, keeping the states of trials already known (a new
        study, or a rebuilt one, takes "finished" from the trials' run folders). A trial
        recorded finished whose run folder does not hold its final checkpoint runs again. A
        replaced spec (a study that trained nothing) leaves its study.json beside."""
        trials = expand(spec)
        if self.data is not None and self.data["spec"] not in (None, spec) and \
                self.path.exists() and self.nothing_trained():
            kept = self._set_aside("replaced")
            print(f"study.py: no trial of the study in {self.out} had trained; its spec is "
                  f"replaced by this one (the old study.json is kept as {kept.name})",
                  file=sys.stderr)
        states = {t["name"]: t for t in (self.data or {}).get("trials", [])}
        for trial in trials:
            old = states.get(trial["name"], {})
            trial.update(state=old.get("state", "pending"), attempts=old.get("attempts", 0),
                         reason=old.get("reason"), log_tail=old.get("log_tail"))
            done = complete(self.out / trial["name"])
            if trial["state"] == "finished" and not done:
                trial.update(state="pending", reason=f"recorded finished, but "
                             f"{self.out / trial['name']} holds no checkpoint at its last "
                             f"step: run again")
            elif done and trial["state"] != "finished":
                trial.update(state="finished", reason=None, log_tail=None)
        self.data = dict(spec=spec, trials=trials)
        self.save()

    def lock(self, reread=True):
        """Hold DIR/.study.lock while this invocation runs the study (returns the open lock
        file): a second study.py on the same DIR is refused at once; the lock goes with the
        process, so a killed study never blocks its rerun."""
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / ".study.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StudyError(f"another study.py is running the study in {self.out}; wait for it "
                             f"to end, or stop it first") from None
        try:
            if reread:  # as it is now that no one else changes it
                self.data = self.read()
        except StudyError:
            handle.close()
            raise
        return handle

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)

    def unfinished(self, retries, progress):
        """The trials to run; a trial whose run ended after the study last saw it (the study
        was stopped or killed at that moment) is recorded as finished instead."""
        todo = []
        for trial in self.data["trials"]:
            if trial["state"] == "finished":
                continue
            if complete(self.out / trial["name"]):
                trial.update(state="finished", reason=None, log_tail=None)
                progress.finished(trial)
                continue
            if trial["state"] == "failed" and trial["attempts"] > retries:
                trial["attempts"] = 0  # a new invocation gives a failed trial its retries again
            todo.append(trial)
        self.save()
        return todo

    def started(self, trial):
        trial.update(state="running", attempts=trial["attempts"] + 1)
        self.save()

    def ended(self, trial, code, stopped, progress, retries, reason=None):
        """Record how a trial's run.py ended; True when it should be retried."""
        tail = log_tail(self.out, trial)
        retry = False
        if code == 0:
            trial.update(state="finished", reason=None, log_tail=None)
            progress.finished(trial)
        elif stopped:
            trial.update(state="pending", reason="stopped by a signal", log_tail=tail)
        else:
            retry = trial["attempts"] <= retries
            trial.update(state="failed", reason=reason or exit_reason(code, tail), log_tail=tail)
            progress.write(f"failed {trial['name']} (attempt {trial['attempts']}): "
                           f"{trial['reason']}; " + ("retrying from its checkpoint" if retry
                                                     else "giving up"))
        self.save()
        return retry



class Progress:
    """One bar for the study (trials done / total, steps done / total, ETA, from the runs' own
    metrics.jsonl) and one line per finished trial with its final scores."""

    def __init__(self, study, steps):
        self.study, self.steps = study, steps
        self.done = {t["name"]: (steps[t["name"]] if t["state"] == "finished"
                                 else current_step(study.out / t["name"]))
                     for t in study.data["trials"]}
        self.bar = progress(sum(steps.values()), sum(self.done.values()), self._trials(),
                            every_s=600)
        self.polled = 0.0

    def _trials(self):
        finished = sum(t["state"] == "finished" for t in self.study.data["trials"])
        return f"trials {finished}/{len(self.study.data['trials'])}"

    def _advance(self, name, step):
        step = min(step, self.steps[name])
        if step > self.done[name]:
            self.bar.update(step - self.done[name])
            self.done[name] = step

    def poll(self, every=1.0):
        if time.monotonic() - self.polled < every:
            return
        self.polled = time.monotonic()
        for trial in self.study.data["trials"]:
            if trial["state"] == "running":
                self._advance(trial["name"], current_step(self.study.out / trial["name"]))

    def finished(self, trial):
        self._advance(trial["name"], self.steps[trial["name"]])
        self.bar.set_description(self._trials(), refresh=False)
        self.write(f"finished {trial['name']}: {final_line(self.study.out / trial['name'])}")

    def write(self, line):
        self.bar.write(line, file=sys.stdout)

    def close(self):
        self.bar.close()


# --- the engines ---------------------------------------------------------------------------------

def run_local(study, plan, retries, progress):
    """Run every unfinished trial, ``plan.workers`` at a time; returns True if stopped by a
    signal."""
    spec, out = study.data["spec"], study.out
    queue = study.unfinished(retries, progress)
    running, stopping = {}, []  # worker slot -> (process, trial)

    def stop(signum, frame):
        stopping.append(signum)
        for process, _ in running.values():
            process.send_signal(signal.SIGTERM)  # each trial checkpoints at its next step
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (queue and not stopping):  # once stopped, pending trials wait
            for slot in range(plan.workers):
                if slot not in running and queue and not stopping:
                    trial = queue.pop(0)
                    running[slot] = (launch(spec, trial, out,
                                            trial_env(plan.threads, plan.devices[slot])), trial)
                    study.started(trial)
            time.sleep(0.1)
            progress.poll()
            for slot, (process, trial) in list(running.items()):
                code = process.poll()
                if code is not None:
                    del running[slot]
                    if study.ended(trial, code, bool(stopping), progress, retries):
                        queue.append(trial)  # resumes from its checkpoint when it has one
    except BaseException:  # e.g. the disk filled while saving study.json: trials stop too
        for process, _ in running.values():
            process.send_signal(signal.SIGTERM)  # each saves a checkpoint at its next step
        for process, _ in running.values():
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return bool(stopping)


class TrialFailed(RuntimeError):
    """run.py ended with an error under Ray; Ray retries the trial."""


# Seconds a Ray trial's step() waits for its run.py before it reports progress. Ray stops a
# trial (Ctrl-C, SIGTERM) only once its step() returns, and the trial trains on meanwhile: with
# 10 s a short trial could finish before the stop reached it (seen with Ray 2.60).
STEP_POLL = 1.0


def ray_trainable():
    """The Ray Tune trainable of a trial (a class made here, so that Ray is imported only with
    --engine ray): run.py in a child process on the node Ray chose, its threads set from the
    trial's CPUs (Ray sets CUDA_VISIBLE_DEVICES). When Ray stops the trial (Ctrl-C, SIGTERM)
    run.py gets SIGTERM and saves a checkpoint; a retry by Ray sets it up again, and run.py
    resumes from the run folder's own checkpoint."""
    from ray import tune

    class Trial(tune.Trainable):
        def setup(self, config):
            self.out, self.trial = Path(config["out"]), config["trial"]
            self.process = launch(config["spec"], self.trial, self.out,
                                  trial_env(config["threads"]), cwd=config["cwd"])

        def step(self):
            try:
                code = self.process.wait(timeout=STEP_POLL)
            except subprocess.TimeoutExpired:
                return {"step": current_step(self.out / self.trial["name"])}
            if code != 0:
                raise TrialFailed(exit_reason(code, log_tail(self.out, self.trial)))
            return {**final_values(self.out / self.trial["name"]), "done": True}

        def save_checkpoint(self, checkpoint_dir):  # the run folder holds the real one
            return {"run_folder": str(self.out / self.trial["name"]),
                    "step": current_step(self.out / self.trial["name"])}

        def load_checkpoint(self, checkpoint):  # run.py --resume reads the run folder's own
            pass

        def cleanup(self):
            if self.process.poll() is None:  # stopped by Ray: a checkpoint at the next step
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    self.process.kill()
    return Trial


def run_ray(study, args, retries, progress):
    """The unfinished trials as Ray Tune trials; returns True if stopped by a signal."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables of its own
    import ray
    from ray import tune
    todo = study.unfinished(retries, progress)
    if not todo:
        return False
    by_name = {t["name"]: t for t in todo}
    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    if args.address:
        ray.init(address=args.address, runtime_env=runtime_env, log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        ray.init(num_cpus=usable_cpus(), runtime_env=runtime_env, log_to_driver=False,
                 logging_level=logging.ERROR, include_dashboard=False)
    stopped = []

    class Bookkeeping(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            study.started(by_name[trial.config["trial"]["name"]])

        def on_trial_error(self, iteration, trials, trial, **info):
            ours = by_name[trial.config["trial"]["name"]]
            path = Path(trial.error_file or "")
            error = path.read_text(errors="replace") if path.is_file() else ""
            reasons = re.findall(r"TrialFailed: (.*)", error) or [
                f"Ray: {line.strip()}" for line in error.splitlines() if line.strip()]
            study.ended(ours, 1, bool(stopped), progress, retries,
                        reason=reasons[-1] if reasons else "its Ray worker died")

        on_trial_recover = on_trial_error  # a failure that Ray retries (up to --retries)

        def on_trial_complete(self, iteration, trials, trial, **info):
            study.ended(by_name[trial.config["trial"]["name"]], 0, False, progress, retries)

        def on_step_end(self, iteration, trials, **info):
            progress.poll()

    def sigterm(signum, frame):  # a cluster scheduler's SIGTERM stops the study like Ctrl-C
        stopped.append(signum)
        os.kill(os.getpid(), signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, sigterm)
    # A failed trial's traceback goes to its error file; the study prints the reason in one line.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    import study as module  # workers import it by name (PYTHONPATH), not pickled from __main__
    tuner = tune.Tuner(
        tune.with_resources(module.ray_trainable(), resources),
        param_space=dict(trial=tune.grid_search([{k: t[k] for k in ("name", "metric", "seed",
                                                                      "settings")} for t in todo]),
                         spec=study.data["spec"],
                         out=str(study.out.resolve()), cwd=os.getcwd(),
                         threads=max(1, int(args.cpus_per_trial))),
        tune_config=tune.TuneConfig(trial_name_creator=lambda t: t.config["trial"]["name"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["name"]),
        run_config=tune.RunConfig(
            name=time.strftime("%Y%m%d-%H%M%S"), storage_path=str((study.out / ".ray").resolve()),
            failure_config=tune.FailureConfig(max_failures=retries), callbacks=[Bookkeeping()],
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
            verbose=0))
    try:
        tuner.fit()
    except KeyboardInterrupt:
        stopped.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()
    for trial in todo:
        if trial["state"] == "running":  # stopped by Ray before it ended
            stopped.append("ray")
            trial.update(state="pending", reason="stopped by a signal")
    study.save()
    return bool(stopped)


# --- results -------------------------------------------------------------------------------------

def final_line(folder):
    return ", ".join(f"{name} {value:.4g}" for name, value in final_values(folder).items())


def final_values(folder):
    """A finished run's measures: recon, KL, ELBO and i_max over the evaluation sample of its
    final evaluation (``solver.sample_measures``; i_max keyed by its omega when it is not the
    default 0.9) and the last evaluation's disentanglement scores, from its own files. A run
    evaluated before the sample measures existed has scores only: the last step's minibatch
    losses measure something else and are never mixed in."""
    run = RunFolder(folder)
    measures = run.last_evaluated("measures")
    values = {measure_key(name, measures): measures[name] for name in SAMPLE_MEASURES
              if name in measures}
    values.update({k: v["score"] for k, v in run.last_evaluated("scores").items()})
    return values


def measure_key(name, measures):
    omega = measures["measure_omega"]
    return name if name != "i_max" or omega == MEASURE_OMEGA else f"i_max@{omega:g}"


def measure_label(key):
    """'I_max (omega 0.9)', 'FactorVAE score', ... for a summary column."""
    if key.startswith("i_max"):
        return f"I_max (omega {key.partition('@')[2] or f'{MEASURE_OMEGA:g}'})"
    return MEASURE_LABELS.get(key) or METRIC_LABELS.get(key) or dict(udr="UDR").get(key, key)


def configuration_label(study, config, trials):
    """The objective's name with the settings its runs really used (their config.json), e.g.
    "Non-Syn VAE (alpha 5, omega 0.9)"."""
    for trial in trials:
        stored = RunFolder(study.out / trial["name"]).read_config().get("config")
        if stored:
            return objective_label(stored)
    return objective_label(dict(metric=config[0], **dict(config[1])))


def write_if_changed(path, data):
    """Write ``data`` atomically unless ``path`` already holds exactly it (a rerun of a finished
    study changes no file)."""
    if not (path.exists() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def summarise(study):
    """summary.md, summary.csv, ttests.csv and curves.png from the finished trials' own files;
    returns the summary's rows."""
    groups = {}
    for trial in study.data["trials"]:
        groups.setdefault(configuration(trial), []).append(trial)
    rows, samples, labels, why, notes, udr_fp32 = [], {}, {}, {}, [], set()
    for config, trials in groups.items():
        finished = [t for t in trials if t["state"] == "finished"]
        values = samples[config] = {}
        for trial in finished:
            for name, value in final_values(study.out / trial["name"]).items():
                values.setdefault(name, []).append(value)
            for name, note in score_notes(study.out / trial["name"]).items():
                why.setdefault((config, name), []).append(note)
        labels[config] = configuration_label(study, config, finished or trials)
        if len(finished) >= 2:  # UDR ranks the seeds of one configuration against each other
            values["udr"], fp32 = udr_scores(study, finished, labels[config])
            if fp32:
                udr_fp32.add(labels[config])
        row = dict(label=labels[config], metric=config[0], **dict(config[1]), n=len(finished),
                   missing=len(trials) - len(finished), config=config)
        for name, xs in values.items():
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(xs)
            row[f"{name}_n"] = len(xs)
        rows.append(row)
    columns = sorted({k for r in rows for k in r} - {"config"}, key=_column_order)
    measures = sorted({k[:-5] for k in columns if k.endswith("_mean")}, key=_column_order)
    tests = welch_tests(samples, measures, labels)
    write_if_changed(study.out / "summary.csv", _csv(columns, rows))
    write_if_changed(study.out / "ttests.csv",
                     _csv(["a", "b", "measure", "n_a", "n_b", "p_value", "meaningful"], tests))
    lines = ["| objective | n | " + " | ".join(measure_label(m) for m in measures) + " |",
             "|" + " --- |" * (2 + len(measures))]
    partial = False
    for r in rows:
        cells = []
        for m in measures:
            if m + "_mean" not in r:
                cells.append("")
                continue
            text = mean_std_text(r[m + "_mean"], r[m + "_std"])
            if r[m + "_n"] != r["n"]:
                text, partial = f"{text} (n={r[m + '_n']})", True
            if said := why.get((r["config"], m)):
                counted = Counter(said)
                notes.append(f"{measure_label(m)} of {r['label']}: " + "; ".join(
                    f"{note} ({k} of {r[m + '_n']} seeds)" for note, k in counted.items()))
                text = f"{text} [{len(notes)}]"
            cells.append(text)
        lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
    omegas = sorted({m.partition("@")[2] or f"{MEASURE_OMEGA:g}" for m in measures
                     if m.startswith("i_max")})
    lines.append("\nmean ± sample standard deviation over the finished seeds (n). recon, KL, "
                 "ELBO and I_max: the final evaluation's fixed sample of images, the same for "
                 "every run (" + (f"I_max: the KL of the worst set at omega {', '.join(omegas)}, "
                                  "alpha-free, alike for every objective; " if omegas else "")
                 + "docs/studies.md); scores: the last evaluation.")
    if any("udr_mean" in r for r in rows):
        lines.append(f"\nUDR (Duan et al. 2020, disentanglement_lib's udr_sklearn: Lasso alpha "
                     f"{UDR_PROTOCOL['alpha']:g}, latents of mean KL <= "
                     f"{UDR_PROTOCOL['kl_filter_threshold']:g} left out, the median over the "
                     f"other seeds) needs no labels: each seed's score says how much the other "
                     f"seeds of its configuration learned the same latents, from their mean codes "
                     f"of the same {UDR_PROTOCOL['num_data_points']:,} images; configurations "
                     f"with one finished seed have none."
                     + (f" Encoded in fp32, not bf16 (no native bf16 on this CPU): "
                        f"{', '.join(sorted(udr_fp32))}." if udr_fp32 else ""))
    if partial:
        lines.append("\n(n=k): only k of the finished seeds have this measure (runs evaluated "
                     "before it existed); the others are left out, not mixed in.")
    missing = sum(r["missing"] for r in rows)
    if missing:
        lines.append(f"\n{missing} trial(s) have not finished; the table summarises the rest.")
    if notes:
        lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    if tests:
        lines += ["", f"Welch's t-test p-values, {tested_pairs(list(samples))[1]} (ttests.csv); "
                      f"n: the seeds of a and of b:",
                  "",
                  "| a | b | n | " + " | ".join(measure_label(m) for m in measures) + " |",
                  "|" + " --- |" * (3 + len(measures))]
        pairs = {}
        for t in tests:
            pairs.setdefault((t["a"], t["b"]), {})[t["measure"]] = t
        weak = False
        for (a, b), ts in pairs.items():
            ns = {(t["n_a"], t["n_b"]) for t in ts.values()}
            cells = []
            for m in measures:
                t = ts.get(m)
                if t is None:
                    cells.append("")
                    continue
                text = (f"{t['p_value']:.2g}" if math.isfinite(t["p_value"]) else
                        "undefined (no spread)") + ("" if len(ns) == 1 else
                                                f" (n {t['n_a']}/{t['n_b']})")
                if not t["meaningful"] and math.isfinite(t["p_value"]):
                    text, weak = f"{text} †", True
                cells.append(text)
            n_text = "/".join(map(str, next(iter(ns)))) if len(ns) == 1 else "varies"
            lines.append(f"| {a} | {b} | {n_text} | " + " | ".join(cells) + " |")
        if weak:
            lines.append(f"\n† fewer than {MEANINGFUL_N} seeds in a group: Welch's test then "
                         f"rests on one or two degrees of freedom and its p-value is not "
                         f"meaningful (it is printed, not to be read as evidence); run "
                         f"--seeds {MEANINGFUL_N} or more.")
    write_if_changed(study.out / "summary.md", ("\n".join(lines) + "\n").encode())
    curves_figure(study, groups, labels, study.out / "curves.png")
    return rows


MEANINGFUL_N = 3  # seeds per group below which a Welch p-value is printed as not meaningful


def udr_scores(study, finished, label):
    """Each finished seed's UDR among the finished seeds of its configuration (in ``finished``'s
    order) and whether any was encoded in fp32 for want of native bf16; NaN for all, with a
    warning naming the problem, when a run's model cannot be read."""
    try:
        inputs, lowered = udr_inputs([RunFolder(study.out / t["name"]) for t in finished])
    except ConfigError as err:
        print(f"warning: no UDR for {label}: {err}", file=sys.stderr)
        return [math.nan] * len(finished), False
    scores, _ = udr([codes for codes, _ in inputs], [kl for _, kl in inputs],
                    UDR_PROTOCOL["alpha"], UDR_PROTOCOL["kl_filter_threshold"])
    return scores, lowered


def score_notes(folder):
    """{metric: why its last score is what it is} for the scores of a finished run that are
    exactly 0 or not finite (``metrics.score_note``), from its own metrics.json."""
    run = RunFolder(folder)
    return {name: note for name, result in run.last_evaluated("scores").items()
            if (note := score_note(name, result))}


def tested_pairs(configurations):
    """(pairs, what they are): every other objective's configuration against each Non-Syn VAE
    configuration, or, in a study without Non-Syn VAE, every pair of configurations whose
    objectives differ."""
    nonsyn = [c for c in configurations if c[0] in NONSYN]
    if nonsyn:
        return ([(a, b) for a in nonsyn for b in configurations if b[0] not in NONSYN],
                "each objective against Non-Syn VAE")
    return ([(a, b) for a, b in itertools.combinations(configurations, 2) if a[0] != b[0]],
            "configurations of different objectives")


def welch_tests(samples, measures, labels):
    """Welch's t-test p-value per measure for each of ``tested_pairs`` (both with at least two
    finished seeds)."""
    from scipy.stats import ttest_ind
    tests = []
    for a, b in tested_pairs(list(samples))[0]:
        for measure in measures:
            xs, ys = samples[a].get(measure, []), samples[b].get(measure, [])
            if len(xs) >= 2 and len(ys) >= 2:
                p = float(ttest_ind(xs, ys, equal_var=False).pvalue)
                tests.append(dict(a=labels[a], b=labels[b], measure=measure, n_a=len(xs),
                                  n_b=len(ys), p_value=p,
                                  meaningful=min(len(xs), len(ys)) >= MEANINGFUL_N))
    return tests


def curves_figure(study, groups, labels, path):
    """recon, KL and i_max of the training log against the step: per configuration the mean
    over its finished seeds with a ± one standard deviation band (steps logged by all of them;
    runs logged before i_max existed are left out of that panel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (config, trials) in enumerate(groups.items()):
        runs = [{r["step"]: r for r in RunFolder(study.out / t["name"]).records("train")}
                for t in trials if t["state"] == "finished"]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        for ax, (loss, _) in zip(axes, CURVES, strict=True):
            logged = [r for r in runs if all(loss in r[s] for s in steps)]
            if not logged:
                continue
            stats = [mean_std([r[s][loss] for r in logged]) for s in steps]
            mean = [m for m, _ in stats]
            ax.plot(steps, mean, color=f"C{i}", label=f"{labels[config]} (n={len(logged)})")
            ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats],
                            color=f"C{i}", alpha=0.2, linewidth=0)
    for ax, (_, title) in zip(axes, CURVES, strict=True):
        ax.set_xlabel("step")
        ax.set_title(f"{title} (training minibatch)", fontsize=10)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    write_if_changed(path, buffer.getvalue())


def _csv(columns, rows):
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue().encode()


def _column_order(name):
    first = ("label", "metric", *AXES, "n", "missing", *SAMPLE_MEASURES)
    stem = name.rsplit("_", 1)[0] if name.endswith(("_mean", "_std", "_n")) else name
    stem = stem.partition("@")[0]
    return (first.index(stem) if stem in first else len(first), name)


def planned_steps(study, configs):
    """Each trial's step count: the run folder's settings, or the checked flags'."""
    steps = {}
    for trial in study.data["trials"]:
        stored = RunFolder(study.out / trial["name"]).settings()
        steps[trial["name"]] = (stored or configs[trial["name"]])["steps"]
    return steps


def main(argv=None):
    """The study command; the exit code (0 done, 1 a trial failed, 2 bad input, 3 disk full,
    130 stopped)."""
    p, args, shared = parse_args(argv)
    try:
        return _main(p, args, shared)
    except DiskFull as err:
        print(f"error: no space left on device while writing {err.path or 'a file'} of the "
              f"study in {args.out}; every file of the study keeps its previous version and "
              f"stopped trials keep their checkpoints. Free some space, then run the same "
              f"study.py command again", file=sys.stderr)
        return 3


def _main(p, args, shared):
    where = Path(args.out).absolute()
    while not where.exists() and where != where.parent:  # the folder, or where it will be made
        where = where.parent
    try:
        check_writable(where, "study.py (study.json, summaries, the run folders)")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        study = Study(args.out)
    except StudyError as err:
        study = Study(args.out, read=False)
        if args.summary:  # the run folders still say everything a summary needs
            study.data = dict(spec=None, trials=folder_trials(args.out))
            print(f"study.py: {study.path} is unreadable; summarising the run folders in "
                  f"{args.out} instead", file=sys.stderr)
        elif not args.rebuild:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.summary:
        if study.data is None:
            refuse(f"{args.out} holds no study.json")
        rows = summarise(study)
        print(f"wrote {study.out}/summary.md, summary.csv, ttests.csv, curves.png "
              f"({len(rows)} configurations)")
        return 0
    spec = make_spec(p, args, shared)
    if args.retries < 0:
        refuse("--retries must be 0 or more")
    given = {flag for flag in ("workers", "threads", "trials_per_gpu", "address",
                               "cpus_per_trial", "gpus_per_trial")
             if getattr(args, flag) != p.get_default(flag)}
    other = given & ({"address", "cpus_per_trial", "gpus_per_trial"} if args.engine == "local"
                     else {"workers", "threads", "trials_per_gpu"})
    if other:
        refuse(f"--{sorted(other)[0].replace('_', '-')} is for --engine "
                f"{'ray' if args.engine == 'local' else 'local'}; with --engine {args.engine} "
                + ("use --cpus-per-trial / --gpus-per-trial" if args.engine == "ray"
                   else "use --workers / --threads / --trials-per-gpu"))
    try:
        if args.engine == "ray":
            try:
                import ray  # noqa: F401  (the optional extra)
            except ImportError:
                raise StudyError(f"--engine ray needs Ray, an optional extra: {RAY_INSTALL}") \
                    from None
            if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
                raise StudyError("--cpus-per-trial must be above 0 and --gpus-per-trial 0 or more")
            where = (f"Ray at {args.address}" if args.address else "a local Ray instance") + (
                f", {args.cpus_per_trial:g} CPU(s) and {args.gpus_per_trial:g} GPU(s) per trial")
        else:
            cuda = not any(f in ("--no-cuda", "--no_cuda") for seed in spec["seed"]
                           for f in trial_flags(spec, seed))
            plan = plan_local(usable_cpus(), visible_gpus() if cuda else [], args.workers,
                              args.threads, args.trials_per_gpu, cuda)
            where = (f"{plan.workers} worker(s) x {plan.threads} thread(s)"
                     + (f" on GPU(s) {', '.join(plan.devices)}" if plan.devices[0] else ""))
        spec, configs = scale_records(spec, study, args.preset)  # nothing written yet
        if not args.rebuild:
            study.check_spec(spec, args.extend)
        # a trial without a run folder (new, or recorded finished but its folder is gone)
        trials = expand(spec)
        check_trial_folders(study.out, trials, configs)
        imports = (importable(study.out, trials, configs, args.import_finished)
                   if args.import_finished else [])
        resumed = (resumable_imports(study.out, trials, configs, args.import_unfinished,
                                     {name for name, _ in imports})
                   if args.import_unfinished else [])
        held = study.lock(reread=not args.rebuild)  # noqa: F841  (held until this ends)
        if args.rebuild:
            study.rebuild()
        else:
            study.check_spec(spec, args.extend)  # again, now that no one else changes it
        if taken := take_imports(study.out, imports):
            print(f"study.py: took {len(taken)} finished trial(s) from {args.import_finished}: "
                  f"{', '.join(taken)}", file=sys.stderr)
        if taken := take_imports(study.out, resumed):
            print(f"study.py: took {len(taken)} stopped trial(s) from {args.import_unfinished} "
                  f"to resume: " + ", ".join(f"{name} ({note.split(';')[0]})"
                                             for name, _, note in resumed if name in taken),
                  file=sys.stderr)
        study.adopt(spec)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pending = [t for t in study.data["trials"] if t["state"] != "finished"]
    total = len(study.data["trials"])
    print(f"study {study.out}: {total} trials, {total - len(pending)} finished"
          + (f"; running {len(pending)} with {where}" if pending else ""), flush=True)
    stopped = False
    if pending:
        progress = Progress(study, planned_steps(study, configs))
        try:
            stopped = (run_ray(study, args, args.retries, progress) if args.engine == "ray"
                       else run_local(study, plan, args.retries, progress))
        finally:
            progress.close()
    rows = summarise(study)
    print(f"wrote {study.out}/summary.md, summary.csv, ttests.csv, curves.png "
          f"({len(rows)} configurations)")
    failed = sum(t["state"] == "failed" for t in study.data["trials"])
    if stopped:
        print(f"stopped: every running trial saved a checkpoint at its last step. Resume with "
              f"the same command (python study.py --out {study.out} ...).", file=sys.stderr)
        return 130
    if failed:
        print(f"{failed} trial(s) failed: see the reason and log tail in {study.path}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
