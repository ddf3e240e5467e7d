"""Step-time benchmark: the default Non-Syn step against the step as it was before the Speed
work, bf16, the plain VAE, FactorVAE, the other Non-Syn updates and the greedy selection alone.

    python benchmark.py [--batch_size 64] [--steps 30] [--rounds 5] [--threads N] [--cuda]
                        [--visdom-port PORT]
    python benchmark.py --metrics [--grid full | --run RUN_DIR] [--threads N] [--cuda]
    python benchmark.py --study [--trials 4] [--overhead-steps 20] [--rounds 3]
                        [--trial-steps 400]

Variants run on the same batch size, interleaved round by round so that machine noise hits them
alike; each line is the median over rounds of the mean step time of the training loop's step
(Solver.advance). The default variants (channels-last, freed memory kept by malloc; bf16 where
the device has it natively; "NCHW": the same with NCHW activations) run in this process; the
"@7adde97" ones, the step as main had it before (NCHW activations, glibc's default malloc), run
in a child process, because the allocator setting is process-wide. With --visdom-port (a running
visdom server) a variant with live plotting at the default gather/push intervals is added.

With --metrics it times an evaluation instead: one encoding pass over the grid, then every
disentanglement metric with its default protocol on those codes (a freshly initialised model,
or with --run a trained one).

With --study it times study.py's local engine against plain run.py processes (reduced grid, no
evaluation, alone on the machine): the overhead per trial (study.py with one worker x one thread
vs the same trials as back-to-back run.py processes with one thread), and the total training
throughput, in steps/s of wall-clock time, of one trial per core (the default), of one worker
with every core, and of one plain run.py with every core.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metrics import METRIC_NAMES, METRICS, PROTOCOLS, lookup
from precision import native_bf16
from solver import Config, Solver, Trained, encode_all
from synergy import greedy_best_set
from utils import RunFolder


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=None, help="default 5 (--study: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cuda", action="store_true", help="benchmark on the GPU")
    p.add_argument("--visdom-port", type=int, help="add a variant streaming to visdom")
    p.add_argument("--metrics", action="store_true", help="time an evaluation instead")
    p.add_argument("--grid", default="full", help="dSprites grid for --metrics")
    p.add_argument("--study", action="store_true", help="time study.py's local engine instead")
    p.add_argument("--trials", type=int, default=4, help="with --study: trials for the overhead")
    p.add_argument("--overhead-steps", type=int, default=20,
                   help="with --study: steps of the trials timed for the overhead")
    p.add_argument("--trial-steps", type=int, default=400,
                   help="with --study: steps of the trials timed for the throughput")
    p.add_argument("--run", help="with --metrics: encode with this run's checkpoint (default: a "
                                 "fresh model, whose latents may all be pruned by FactorVAE)")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.study else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.metrics:
        return benchmark_metrics(args)
    if args.study:
        return benchmark_study(args)
    if args.baseline_worker:
        return baseline_worker(args)

    return benchmark_steps(args)


NCHW = dict(memory_format=torch.contiguous_format)
# The step as main was before the Speed work (7adde97): NCHW activations and glibc's default
# malloc. It runs in a child process, because the allocator setting is process-wide.
BASELINE = {"Non-Syn original @7adde97": (dict(metric="Test_gt"), NCHW),
            "VAE step @7adde97": (dict(metric="VAE"), NCHW),
            "FactorVAE @7adde97": (dict(metric="Factor"), NCHW)}
SPEEDUPS = (("Non-Syn original", "Non-Syn original @7adde97"),
            ("Non-Syn original", "Non-Syn original NCHW"),
            ("Non-Syn original bf16", "Non-Syn original @7adde97"),
            ("Non-Syn original bf16", "Non-Syn original"),
            ("VAE step", "VAE step @7adde97"), ("VAE step bf16", "VAE step @7adde97"),
            ("FactorVAE", "FactorVAE @7adde97"))


def step_variants(args, device):
    variants = {"Non-Syn original": (dict(metric="Test_gt"), {}),
                "Non-Syn original NCHW": (dict(metric="Test_gt"), NCHW),
                "VAE step": (dict(metric="VAE"), {}),
                "FactorVAE": (dict(metric="Factor"), {}),
                "Non-Syn two-step": (dict(metric="Test_gt", update="two-step"), {}),
                "Non-Syn joint": (dict(metric="Test_gt", update="joint"), {})}
    if native_bf16(device):
        variants["Non-Syn original bf16"] = (dict(metric="Test_gt", precision="bf16"), {})
        variants["VAE step bf16"] = (dict(metric="VAE", precision="bf16"), {})
    if args.visdom_port:
        variants["original + visdom"] = (dict(metric="Test_gt", viz_on=True,
                                              viz_port=args.visdom_port), {})
    return variants


class Stepper:
    """Solvers of some variants in this process, timed a round at a time."""

    def __init__(self, args, variants, tmp):
        self.steps = args.steps
        self.solvers = {name: Solver(Config(grid="reduced", batch_size=args.batch_size,
                                            cuda=args.cuda, alpha=5.0, omega=0.9, **kw),
                                     tmp, **options)
                        for name, (kw, options) in variants.items()}
        for solver in self.solvers.values():  # warm-up
            for _ in range(5):
                solver.advance()

    def round(self):
        """{variant: mean seconds per step over ``steps`` steps}, one variant after the other."""
        times = {}
        for name, solver in self.solvers.items():
            _sync(solver.device)
            start = time.perf_counter()
            for _ in range(self.steps):
                solver.advance()
            _sync(solver.device)
            times[name] = (time.perf_counter() - start) / self.steps
        return times


def baseline_worker(args):
    """``--baseline-worker``: the BASELINE variants with glibc's default malloc, timed a round
    each time a line arrives on stdin; one JSON line of timings answers each."""
    import solver
    solver.keep_freed_memory = lambda: False  # as 7adde97: freed memory goes back to the kernel
    with tempfile.TemporaryDirectory() as tmp:
        stepper = Stepper(args, BASELINE, tmp)
        print("ready", flush=True)
        for _ in sys.stdin:
            print(json.dumps(stepper.round()), flush=True)


def benchmark_steps(args):
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    worker_flags = ["--baseline-worker", "--steps", str(args.steps), "--batch_size",
                    str(args.batch_size), *(["--threads", str(args.threads)] if args.threads else []),
                    *(["--cuda"] if args.cuda else [])]
    baseline = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *worker_flags],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if baseline.stdout.readline().strip() != "ready":
            raise SystemExit("error: the baseline worker did not start")
        with tempfile.TemporaryDirectory() as tmp:
            stepper = Stepper(args, step_variants(args, device), tmp)
            kl = torch.rand(10, device=device)
            timings = {}
            for _ in range(args.rounds):  # interleaved: this process's variants, then the baseline's
                times = stepper.round()
                baseline.stdin.write("round\n")
                baseline.stdin.flush()
                times.update(json.loads(baseline.stdout.readline()))
                _sync(device)
                start = time.perf_counter()
                for _ in range(args.steps * 10):
                    greedy_best_set(kl, 0.9)
                _sync(device)
                times["greedy selection"] = (time.perf_counter() - start) / (args.steps * 10)
                for name, t in times.items():
                    timings.setdefault(name, []).append(t)
    finally:
        baseline.stdin.close()
        baseline.wait()

    median = {name: statistics.median(t) for name, t in timings.items()}
    base = median["VAE step"]
    print(f"device {device}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds x {args.steps} "
          f"steps")
    for name, t in median.items():
        print(f"  {name:26s} {t * 1e3:8.3f} ms   {t / base:5.3f} x VAE step")
    print("speed-ups (> 1: faster than the reference):")
    for name, reference in SPEEDUPS:
        if name in median:
            print(f"  {name:22s} {median[reference] / median[name]:5.2f}x  vs {reference}")
    if "Non-Syn original bf16" not in median:
        print(f"  (no bf16 variants: {device} has no native bf16)")
    for update in ("original", "two-step"):
        share = median["greedy selection"] / median[f"Non-Syn {update}"]
        print(f"  selection share of the {update} step: {share:.2%}")
    if args.visdom_port:
        overhead = median["original + visdom"] / median["Non-Syn original"] - 1
        print(f"  visdom overhead on the original step: {overhead:+.2%}")
    return median


def benchmark_metrics(args):
    trained = (Trained.load(RunFolder(args.run), cuda=args.cuda) if args.run
               else Trained.build(Config(grid=args.grid, cuda=args.cuda)))
    start = time.perf_counter()
    codes = encode_all(trained.model, trained.data)
    timings = {"encoding pass": time.perf_counter() - start}
    represent, sizes = lookup(codes, trained.data.factor_sizes), trained.data.factor_sizes
    for i, name in enumerate(METRIC_NAMES):
        start = time.perf_counter()
        METRICS[name](represent, sizes, np.random.default_rng([0, i]), **PROTOCOLS[name])
        timings[name] = time.perf_counter() - start
    print(f"device {trained.device}, {trained.config.grid} grid ({len(codes)} images), threads "
          f"{torch.get_num_threads()}")
    for name, t in timings.items():
        print(f"  {name:14s} {t:7.1f} s")
    print(f"  default pair (factor_vae + mig): {timings['factor_vae'] + timings['mig']:.1f} s; "
          f"all five metrics: {sum(timings[n] for n in METRIC_NAMES):.1f} s")
    return timings


ROOT = Path(__file__).resolve().parent
STUDY_FLAGS = ["--grid", "reduced", "--eval-metrics", "none", "--gt-interval", "1000000",
               "--save-interval", "1000000", "--nb-test", "2"]


def _timed(command, threads=None):
    """Wall-clock seconds of ``command`` (a python script and its flags), run to its end."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def benchmark_study(args):
    cores, n = os.cpu_count() or 1, args.trials
    with tempfile.TemporaryDirectory() as tmp:
        def flags(steps):
            return STUDY_FLAGS + ["--steps", str(steps), "--log-interval", str(steps)]

        def study(name, seeds, steps, *placement):
            return _timed(["study.py", "--out", f"{tmp}/{name}", "--metric", "Test_gt", "--seed",
                           *map(str, seeds), *placement, "--", *flags(steps)])
        # Overhead: short trials, so that the training's own noise does not hide it; plain and
        # study interleaved round by round.
        overheads = []
        for r in range(args.rounds):
            plain = sum(_timed(["run.py", *flags(args.overhead_steps), "--seed", str(seed),
                                "--output_dir", tmp, "--run-name", f"plain{r}_{seed}"], threads=1)
                        for seed in range(1, n + 1))
            one = study(f"one{r}", range(1, n + 1), args.overhead_steps, "--workers", "1",
                        "--threads", "1")
            overheads.append((one - plain) / n)
            print(f"round {r + 1}: {n} trials x {args.overhead_steps} steps, 1 thread each: "
                  f"back-to-back run.py {plain:.1f} s, study.py --workers 1 {one:.1f} s: "
                  f"{overheads[-1]:+.2f} s per trial")
        overhead = statistics.median(overheads)
        print(f"study overhead per trial (median of {args.rounds} rounds): {overhead:+.2f} s")
        steps, seeds = args.trial_steps, range(1, cores + 1)
        wide = study("wide", seeds, steps)  # the default: one trial per core, one thread each
        deep = study("deep", seeds, steps, "--workers", "1", "--threads", str(cores))
        single = _timed(["run.py", *flags(steps), "--output_dir", tmp, "--run-name", "single"],
                        threads=cores)
    print(f"{cores} cores, {cores} trials x {steps} steps (wall-clock, start-up included):")
    print(f"  study.py default ({cores} workers x 1 thread) {wide:6.1f} s  "
          f"{cores * steps / wide:6.1f} steps/s in total")
    print(f"  study.py 1 worker x {cores} threads        {deep:6.1f} s  "
          f"{cores * steps / deep:6.1f} steps/s in total")
    print(f"  one plain run.py, {cores} threads (1 trial)  {single:6.1f} s  "
          f"{steps / single:6.1f} steps/s")
    return dict(overhead=overhead, wide=wide, deep=deep, single=single)


if __name__ == "__main__":
    main()
