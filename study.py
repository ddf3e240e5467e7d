"""Many runs as one command: a grid of trials (objectives x seeds x alpha x omega x ...), each an
ordinary run folder made by run.py, run side by side on this machine, then one summary table.

    python study.py --out DIR [--metric Test_gt Factor VAE BVAE] [--seeds N | --seed 1 2 3]
                    [--alpha ...] [--omega ...] [--gamma ...] [--beta ...] [--spec FILE.json]
                    [--preset thesis] [--workers W] [--threads T] [--retries 2] [--extend]
                    [--summary] [-- run.py flags shared by every trial]

Axes that do not apply to an objective (alpha and omega for VAE, gamma for Non-Syn) do not
multiply its trials. DIR/study.json records the spec, the trials and each trial's state; running
the same command again skips finished trials, resumes interrupted ones from their checkpoints
and retries failed ones (at most --retries times). A different spec for an existing DIR is
refused (``--extend`` may add axis values or seeds). summary.md / summary.csv: per
configuration, the number of finished seeds and mean ± std of the final losses and scores.

This is the local engine only; see the README for what is not there yet.
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from utils import RunFolder, atomic_write_bytes, write_json

ROOT = Path(__file__).resolve().parent
OBJECTIVE_AXES = {"Test_gt": ("alpha", "omega"), "test": ("alpha", "omega"), "VAE": (),
                  "BVAE": ("beta",), "BVAE_gt": ("beta",), "Factor": ("gamma",)}
VALUE_AXES = ("alpha", "omega", "gamma", "beta")
PRESETS = {  # the thesis comparison: the original README's settings
    "thesis": dict(metric=["Test_gt", "Factor", "VAE", "BVAE"], alpha=[5.0], omega=[0.9],
                   gamma=[6.4], beta=[4.0],
                   flags=["--steps", "150000", "--gt-interval", "5000"]),
}
STATES = ("pending", "running", "finished", "failed")


class StudyError(ValueError):
    """The study's spec or folder is unusable; the message says what to do."""


def trial_name(metric, settings, seed):
    """Deterministic folder name of a trial from its settings, e.g. Test_gt_alpha5.0_omega0.9_seed1
    (an axis left at run.py's default does not appear)."""
    parts = [metric] + [f"{axis}{settings[axis]!r}" for axis in OBJECTIVE_AXES[metric]
                        if axis in settings]
    return "_".join(parts + [f"seed{seed}"])


def expand(spec):
    """The trials of a spec: [{name, metric, seed, settings}] in a fixed order."""
    trials = []
    for metric in spec["metric"]:
        axes = OBJECTIVE_AXES[metric]
        values = [spec.get(axis) or [None] for axis in axes]
        for combo in itertools.product(*values):
            settings = {a: v for a, v in zip(axes, combo, strict=True) if v is not None}
            for seed in spec["seed"]:
                trials.append(dict(name=trial_name(metric, settings, seed), metric=metric,
                                   seed=seed, settings=settings))
    return trials


def trial_argv(spec, trial, out):
    """run.py's argv for a new trial."""
    argv = list(spec["flags"]) + ["--metric", trial["metric"], "--seed", str(trial["seed"])]
    for axis, value in trial["settings"].items():
        argv += [f"--{axis}", repr(value)]
    return argv + ["--output_dir", str(out), "--run-name", trial["name"]]


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = []
    if "--" in argv:
        cut = argv.index("--")
        argv, shared = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the study folder")
    p.add_argument("--metric", nargs="+", choices=tuple(OBJECTIVE_AXES), help="objectives")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, help="seeds 1..N")
    seeds.add_argument("--seed", nargs="+", type=int, help="these seeds")
    for axis in VALUE_AXES:
        p.add_argument(f"--{axis}", nargs="+", type=float, help=f"{axis} values")
    p.add_argument("--spec", help="a JSON file with the same keys (metric, seed, alpha, ..., flags)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="thesis: the thesis comparison")
    p.add_argument("--workers", type=int, default=None,
                   help="trials run side by side (default: cores / threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/BLAS threads per trial (default: 1, or cores / workers). On 2 "
                        "cores 2 workers x 1 thread finished two trials 15-19 %% sooner than "
                        "1 x 2 (the same training speed, start-up and evaluation overlapped)")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed trial")
    p.add_argument("--extend", action="store_true", help="add axis values or seeds to DIR's study")
    p.add_argument("--summary", action="store_true", help="only write the summary of DIR")
    args = p.parse_args(argv)
    return p, args, shared


def make_spec(p, args, shared):
    spec = dict(PRESETS[args.preset]) if args.preset else {}
    if args.spec:
        try:
            spec.update(json.loads(Path(args.spec).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            p.error(f"--spec {args.spec}: {err}")
    for key in ("metric",) + VALUE_AXES:
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.seeds is not None:
        spec["seed"] = list(range(1, args.seeds + 1))
    elif args.seed is not None:
        spec["seed"] = args.seed
    spec.setdefault("seed", [1])
    spec["flags"] = list(spec.get("flags", [])) + shared
    unknown = sorted(set(spec) - {"metric", "seed", "flags", *VALUE_AXES})
    if unknown:
        p.error(f"unknown axis {', '.join(unknown)}; axes are metric, seed, "
                f"{', '.join(VALUE_AXES)}")
    if not spec.get("metric"):
        p.error("no objective: give --metric (or --preset, --spec)")
    for key in ("metric", "seed", *VALUE_AXES):
        if key in spec and (not isinstance(spec[key], list) or not spec[key]):
            p.error(f"axis {key} is empty: give at least one value")
    bad = [m for m in spec["metric"] if m not in OBJECTIVE_AXES]
    if bad:
        p.error(f"unknown objective {', '.join(bad)}; choose from {', '.join(OBJECTIVE_AXES)}")
    owned = {"--metric", "--seed", "--output_dir", "--output-dir", "--run-name", "--run_name",
             "--resume", *(f"--{a}" for a in VALUE_AXES)}
    clash = [f for f in spec["flags"] if f.split("=")[0] in owned]
    if clash:
        p.error(f"run.py flag {clash[0]} is set by the study itself; give it as an axis")
    return {k: spec[k] for k in ("metric", "seed", *VALUE_AXES, "flags") if k in spec}


def check_trials(spec, trials, out):
    """Every trial's flags, checked by run.py itself (--dry-run) before any trial starts."""
    for trial in trials:
        result = subprocess.run([sys.executable, str(ROOT / "run.py"),
                                 *trial_argv(spec, trial, out), "--dry-run"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise StudyError(f"trial {trial['name']} would be refused by run.py: "
                             f"{lines[-1] if lines else 'exit code ' + str(result.returncode)}")


class Study:
    """DIR/study.json: the spec, the trials and their states."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / "study.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else None

    def check_spec(self, spec, extend):
        """Refuse a spec that would mix with the study already in DIR (``--extend`` may grow
        axes and seeds, nothing else)."""
        if self.data is not None and self.data["spec"] != spec:
            old = self.data["spec"]
            grows = extend and old["flags"] == spec["flags"] and all(
                set(old.get(k, [])) <= set(spec.get(k, [])) for k in old if k != "flags")
            if not grows:
                raise StudyError(f"{self.out} holds a study with another spec ({self.path}); it is "
                                 f"never mixed or deleted: use another --out, the same spec, or "
                                 f"--extend to add axis values or seeds")

    def adopt(self, spec):
        """Record ``spec`` and its trials, keeping the states of trials already known."""
        trials = expand(spec)
        states = {t["name"]: t for t in (self.data or {}).get("trials", [])}
        for trial in trials:
            old = states.get(trial["name"], {})
            trial.update(state=old.get("state", "pending"), attempts=old.get("attempts", 0),
                         reason=old.get("reason"), log_tail=old.get("log_tail"))
        self.data = dict(spec=spec, trials=trials)
        self.save()

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)


def run_trials(study, workers, threads, retries):
    """Run every unfinished trial, ``workers`` at a time; returns the number that failed."""
    spec, out = study.data["spec"], study.out
    todo = [t for t in study.data["trials"] if t["state"] != "finished"]
    for trial in todo:
        if trial["state"] == "failed" and trial["attempts"] > retries:
            trial["attempts"] = 0  # a new invocation gives a failed trial its retries again
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    running, stopping = {}, []

    def stop(signum, frame):
        stopping.append(signum)
        for process, _ in running.values():
            process.send_signal(signal.SIGTERM)  # each trial checkpoints at its next step
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < workers and not stopping:
                trial = queue.pop(0)
                folder = out / trial["name"]
                argv = (["--resume", str(folder)] if (folder / "checkpoints/last.pt").exists()
                        else trial_argv(spec, trial, out))
                log = open(out / f".{trial['name']}.log", "ab")
                process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv],
                                           stdout=log, stderr=subprocess.STDOUT, env=env,
                                           cwd=ROOT)
                log.close()  # the child holds its own copy
                trial.update(state="running", attempts=trial["attempts"] + 1)
                running[process.pid] = (process, trial)
                study.save()
            time.sleep(0.2)
            for pid, (process, trial) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[pid]
                tail = (out / f".{trial['name']}.log").read_text(errors="replace").splitlines()[-5:]
                if code == 0:
                    trial.update(state="finished", reason=None, log_tail=None)
                    print(f"finished {trial['name']}: {final_line(out / trial['name'])}",
                          flush=True)
                elif stopping or code == 130:
                    trial.update(state="pending", reason="stopped by a signal", log_tail=tail)
                else:
                    trial.update(state="failed", reason=f"run.py exited with {code}",
                                 log_tail=tail)
                    if trial["attempts"] <= retries and not stopping:
                        queue.append(trial)  # resumes from its checkpoint when it has one
                study.save()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        print(f"stopped: every running trial saved a checkpoint. Resume with the same command "
              f"(python study.py --out {out} ...).", file=sys.stderr)
    return sum(t["state"] == "failed" for t in study.data["trials"])


def final_line(folder):
    return ", ".join(f"{name} {value:.4g}" for name, value in final_values(folder).items())


def summarise(study):
    """summary.md and summary.csv from the finished trials' own files; returns the rows."""
    groups = {}
    for trial in study.data["trials"]:
        key = (trial["metric"], tuple(sorted(trial["settings"].items())))
        groups.setdefault(key, []).append(trial)
    rows = []
    for (metric, settings), trials in groups.items():
        values = {}
        finished = [t for t in trials if t["state"] == "finished"]
        for trial in finished:
            for name, value in final_values(study.out / trial["name"]).items():
                values.setdefault(name, []).append(value)
        row = dict(metric=metric, **dict(settings), n=len(finished), missing=len(trials) - len(finished))
        for name, samples in values.items():
            row[f"{name}_mean"] = sum(samples) / len(samples)
            row[f"{name}_std"] = (math.sqrt(sum((x - row[f"{name}_mean"]) ** 2 for x in samples)
                                            / (len(samples) - 1)) if len(samples) > 1 else 0.0)
        rows.append(row)
    columns = sorted({k for r in rows for k in r}, key=_column_order)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(study.out / "summary.csv", table.getvalue().encode())
    measures = sorted({k[:-5] for k in columns if k.endswith("_mean")}, key=_column_order)
    settings = [c for c in columns if c in VALUE_AXES]
    lines = ["| metric | " + " | ".join(settings + ["n"] + measures) + " |",
             "|" + " --- |" * (2 + len(settings) + len(measures))]
    for r in rows:
        cells = [str(r.get(s, "")) for s in settings] + [str(r["n"])]
        cells += [f"{r[m + '_mean']:.4g} ± {r[m + '_std']:.2g}" if m + "_mean" in r else ""
                  for m in measures]
        lines.append(f"| {r['metric']} | " + " | ".join(cells) + " |")
    missing = sum(r["missing"] for r in rows)
    if missing:
        lines.append(f"\n{missing} trial(s) have not finished; the table summarises the rest.")
    atomic_write_bytes(study.out / "summary.md", ("\n".join(lines) + "\n").encode())
    return rows


def _column_order(name):
    first = ("metric", *VALUE_AXES, "n", "missing", "recon", "kl", "syn")
    stem = name.rsplit("_", 1)[0] if name.endswith(("_mean", "_std")) else name
    return (first.index(stem) if stem in first else len(first), name)


def final_values(folder):
    """A finished run's final recon, KL, synergy and disentanglement scores (its own files,
    read through RunFolder)."""
    run = RunFolder(folder)
    train, evaluations = run.records("train"), run.evaluations()
    values = {k: train[-1][k] for k in ("recon", "kl", "syn")} if train else {}
    if evaluations:
        values.update({k: v["score"] for k, v in evaluations[-1]["scores"].items()})
    return values


def main(argv=None):
    p, args, shared = parse_args(argv)
    study = Study(args.out)
    if args.summary:
        if study.data is None:
            p.error(f"{args.out} holds no study.json")
        rows = summarise(study)
        print(f"wrote {study.out}/summary.md, summary.csv ({len(rows)} configurations)")
        return 0
    spec = make_spec(p, args, shared)
    cores = os.cpu_count() or 1
    if (args.workers is not None and args.workers < 1) or (args.threads is not None
                                                           and args.threads < 1):
        p.error("--workers and --threads must be at least 1")
    threads = args.threads or (max(1, cores // args.workers) if args.workers else 1)
    workers = args.workers or max(1, cores // threads)
    if workers * threads > cores:
        p.error(f"--workers {workers} x --threads {threads} exceeds the {cores} cores: trials "
                f"that oversubscribe the CPU slow each other down many times over")
    try:
        study.check_spec(spec, args.extend)
        known = {t["name"]: t["state"] for t in (study.data or {}).get("trials", [])}
        fresh = [t for t in expand(spec) if known.get(t["name"]) != "finished"
                 and not (study.out / t["name"] / "checkpoints/last.pt").exists()]
        check_trials(spec, fresh, study.out)  # before anything is written
        study.adopt(spec)
        pending = [t for t in study.data["trials"] if t["state"] != "finished"]
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = len(study.data["trials"])
    print(f"study {study.out}: {total} trials, {total - len(pending)} finished; running "
          f"{len(pending)} with {workers} worker(s) x {threads} thread(s)", flush=True)
    failed = run_trials(study, workers, threads, args.retries) if pending else 0
    rows = summarise(study)
    print(f"wrote {study.out}/summary.md, summary.csv ({len(rows)} configurations)")
    if failed:
        print(f"{failed} trial(s) failed: see the reason and log tail in {study.path}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
