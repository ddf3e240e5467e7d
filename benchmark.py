"""Step-time benchmark: plain VAE vs Non-Syn VAE (original, two-step, joint) vs the greedy
selection alone.

    python benchmark.py [--batch_size 64] [--steps 30] [--rounds 5] [--threads N] [--cuda]
                        [--visdom-port PORT]
    python benchmark.py --metrics [--grid full | --run RUN_DIR] [--threads N] [--cuda]

All variants run in one process on the same batch size, interleaved round by round so that
machine noise hits them alike; each line is the median over rounds of the mean step time of
the training loop's step (Solver.advance). With --visdom-port (a running visdom server) a
variant with live plotting at the default gather/push intervals is added.

With --metrics it times an evaluation instead: one encoding pass over the grid, then every
disentanglement metric with its default protocol on those codes (a freshly initialised model,
or with --run a trained one).
"""
import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from metrics import METRIC_NAMES, METRICS, PROTOCOLS, lookup
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cuda", action="store_true", help="benchmark on the GPU")
    p.add_argument("--visdom-port", type=int, help="add a variant streaming to visdom")
    p.add_argument("--metrics", action="store_true", help="time an evaluation instead")
    p.add_argument("--grid", default="full", help="dSprites grid for --metrics")
    p.add_argument("--run", help="with --metrics: encode with this run's checkpoint (default: a "
                                 "fresh model, whose latents may all be pruned by FactorVAE)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.metrics:
        return benchmark_metrics(args)

    variants = {"VAE step": dict(metric="VAE"),
                "Non-Syn original": dict(metric="Test_gt", update="original"),
                "Non-Syn two-step": dict(metric="Test_gt", update="two-step"),
                "Non-Syn joint": dict(metric="Test_gt", update="joint")}
    if args.visdom_port:
        variants["original + visdom"] = dict(metric="Test_gt", viz_on=True,
                                             viz_port=args.visdom_port)
    with tempfile.TemporaryDirectory() as tmp:
        solvers = {name: Solver(Config(grid="reduced", batch_size=args.batch_size, cuda=args.cuda,
                                       **kw), tmp) for name, kw in variants.items()}
        device = next(iter(solvers.values())).device
        kl = torch.rand(solvers["VAE step"].config.z_dim, device=device)
        timings = {name: [] for name in list(variants) + ["greedy selection"]}
        for solver in solvers.values():  # warm-up
            for _ in range(5):
                solver.advance()
        for _ in range(args.rounds):
            for name, solver in solvers.items():
                _sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    solver.advance()
                _sync(device)
                timings[name].append((time.perf_counter() - start) / args.steps)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps * 10):
                greedy_best_set(kl, 0.9)
            _sync(device)
            timings["greedy selection"].append((time.perf_counter() - start) / (args.steps * 10))

    median = {name: statistics.median(t) for name, t in timings.items()}
    base = median["VAE step"]
    print(f"device {device}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; median of {args.rounds} rounds x {args.steps} steps")
    for name, t in median.items():
        print(f"  {name:18s} {t * 1e3:8.3f} ms   {t / base:5.3f} x VAE step")
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


if __name__ == "__main__":
    main()
