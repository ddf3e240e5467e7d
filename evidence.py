"""The thesis's claims counted over seeds (``python figures.py --evidence STUDY_DIR``): from a
study of the thesis's three models (``study.py --preset evidence``), at one step for every seed
(``--at``, 50,000: seeds 2-5's end, seed 1's kept checkpoint) and at each run's own end:

  claims.md / .json   per claim (plotting.CLAIMS, rules written before the results were read)
                      and objective, how many seeds meet it at --at ("3 of 5"), and whether the
                      runs trained further (seed 1, 110,000 steps) meet it at their end
  scores.md / .json   FactorVAE score, MIG, DCI disentanglement and I_max at --at: mean ± sample
                      standard deviation over the seeds, Welch's t-tests of Non-Syn VAE against
                      each objective (n beside each; n < 3 per group marked not meaningful)
  seeds.png           per objective (rows) and seed (columns), the active latents x factor share
                      matrix as a heatmap, one colour scale
  scores_over_training.png  the scores at every evaluation up to --at: per objective the mean
                      over the seeds with their min-max band
  wallclock.md / .json  per trial its steps, precision, threads, processor, resumes and
                      wall-clock: ``seconds`` at its end and the steady rate (median 5,000-step
                      span), which leaves out the time the study was paused

Everything comes from the runs' own files: the ground-truth summary saved at --at
(<stem>_gt_<step>.npz), the evaluations in metrics.json at --at (the final one; seed 1's from
``evaluate.py RUN --step 50000``), the eval records of metrics.jsonl.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config import NONSYN, OBJECTIVE_NAMES, objective_label
from dataset import FACTOR_NAMES
from metrics import METRIC_LABELS
from plotting import CLAIMS, FACTOR_LABELS, claims_met, factor_shares
from representation import read_summary
from runfolder import RunFolder

SCORES = ("factor_vae", "mig", "dci", "i_max")  # the scores table's columns, in order
LABELS = dict(METRIC_LABELS, i_max="I_max (omega 0.9)")
MEANINGFUL_N = 3  # fewer seeds per group: a t-test's p-value says little
SPAN = 5_000  # wallclock.md's steady rate: steps between two evaluations of the evidence study


class EvidenceError(RuntimeError):
    """The study lacks what a table needs; the message names the run and the file."""


@dataclass
class SeedRun:
    """One run's state at one step: its factor shares, the claims it meets, its scores."""
    name: str
    metric: str
    objective: str
    seed: int
    step: int
    shares: np.ndarray
    active: np.ndarray
    claims: dict
    values: dict = field(default_factory=dict)  # SCORES' keys that the run has at ``step``
    curves: dict = field(default_factory=dict)  # {metric: [(step, score), ...]} up to ``step``


def load_run(folder, step):
    """The SeedRun of ``folder`` at ``step``: its ground-truth summary saved then (required),
    the scores and the sample's I_max of its evaluations at that step (where it has them), and
    its eval records up to that step."""
    config = folder.read_config().get("config") or {}
    summaries = dict(folder.gt_summaries())
    if step not in summaries:
        have = ", ".join(f"{s:,}" for s in sorted(summaries)) or "none"
        raise EvidenceError(f"{folder} has no ground-truth summary at step {step:,} (it has: "
                            f"{have})")
    try:
        summary = read_summary(summaries[step])
        shares, active = factor_shares(summary)
    except (ValueError, KeyError) as err:
        raise EvidenceError(f"{summaries[step]} cannot be read ({err}); "
                            f"'python evaluate.py {folder} --step {step} --eval-metrics none' "
                            f"redraws it from a kept checkpoint") from None
    values = {k: v["score"] for k, v in folder.last_evaluated("scores", step=step).items()
              if k in SCORES}
    measures = folder.last_evaluated("measures", step=step)
    if "i_max" in measures and measures.get("measure_omega", 0.9) == 0.9:
        values["i_max"] = measures["i_max"]
    curves = {}
    for record in folder.records("eval"):
        if record["step"] <= step:
            for name, score in (record.get("scores") or {}).items():
                curves.setdefault(name, []).append((record["step"], score))
    return SeedRun(folder.name, config.get("metric"), objective_label(config),
                   config.get("seed"), step, shares, active,
                   claims_met(summary), values, curves)


def study_trials(study_dir):
    """The trials of a study folder's study.json, in its order."""
    path = Path(study_dir) / "study.json"
    try:
        return json.loads(path.read_text())["trials"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvidenceError(f"--evidence {study_dir}: no readable study.json ({err})") from None


def finished_runs(study_dir):
    """The RunFolders of a study's finished trials, in its order: the runs whose records and
    final weights a figures folder keeps (a running trial's are not final yet)."""
    return [RunFolder(Path(study_dir) / t["name"]) for t in study_trials(study_dir)
            if t.get("state") == "finished" and (Path(study_dir) / t["name"]).is_dir()]


def collect(study_dir, at):
    """(runs at ``at``, runs at their own end beyond ``at``) of a study folder's trials (its
    study.json's order); a trial that has not reached ``at`` yet is left out of both."""
    trials = study_trials(study_dir)
    at_step, longer = [], []
    for trial in trials:
        folder = RunFolder(Path(study_dir) / trial["name"])
        if not folder.path.is_dir():
            continue  # not started yet
        if any(s == at for s, _ in folder.gt_summaries()):
            at_step.append(load_run(folder, at))
        if trial.get("state") == "finished":
            final = folder.gt_summaries()[-1][0] if folder.gt_summaries() else None
            if final is not None and final > at:
                longer.append(load_run(folder, final))
    if not at_step:
        raise EvidenceError(f"--evidence {study_dir}: no run has reached step {at:,} yet")
    return at_step, longer


def objectives(runs):
    """The objectives' labels in the order of their first run, Non-Syn VAE first."""
    seen = list(dict.fromkeys(r.objective for r in runs))
    return sorted(seen, key=lambda o: not any(r.metric in NONSYN for r in runs
                                              if r.objective == o))


def claims_table(at_step, longer, at):
    """(markdown lines, rows): per claim and objective "n of N" seeds meeting it at ``at``,
    and for runs trained further, whether each meets it at its end."""
    names = objectives(at_step)
    rows = []
    for key, claim, _ in CLAIMS:
        row = dict(claim=claim, key=key)
        for objective in names:
            group = [r for r in at_step if r.objective == objective]
            further = [r for r in longer if r.objective == objective]
            row[objective] = dict(
                met=sum(r.claims[key] for r in group), n=len(group),
                seeds=[r.seed for r in group if r.claims[key]],
                further={f"seed {r.seed} at {r.step:,}": r.claims[key] for r in further})
        rows.append(row)
    ends = sorted({f"seed {r.seed} at {r.step:,}" for r in longer})
    head = ["claim"] + [c for o in names for c in
                        [f"{o}: seeds at {at:,}"] + [f"{o}: {e}" for e in ends]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["claim"]]
        for objective in names:
            cell = row[objective]
            cells.append(f"{cell['met']} of {cell['n']}")
            cells += [("yes" if cell["further"][e] else "no") if e in cell["further"] else ""
                      for e in ends]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, rows


def scores_table(at_step, at):
    """(markdown lines, rows, tests): per objective mean ± std (n) of each score at ``at``;
    Welch's t-tests of the Non-Syn VAE objective against each other one."""
    from scipy.stats import ttest_ind

    names = objectives(at_step)
    samples = {o: {k: [r.values[k] for r in at_step if r.objective == o and k in r.values]
                   for k in SCORES} for o in names}
    rows = []
    lines = ["| objective | " + " | ".join(LABELS[k] for k in SCORES) + " |",
             "|" + " --- |" * (1 + len(SCORES))]
    for objective in names:
        row = dict(objective=objective)
        cells = []
        for key in SCORES:
            xs = samples[objective][key]
            if not xs:
                cells.append("")
                continue
            mean, std = mean_std(xs)
            row[key] = dict(mean=mean, std=std, n=len(xs), values=xs)
            cells.append(f"{mean_std_text(mean, std)} (n={len(xs)})")
        rows.append(row)
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")
    base = [o for o in names if any(r.metric in NONSYN for r in at_step if r.objective == o)]
    tests = []
    for a in base:
        for b in names:
            if b in base:
                continue
            for key in SCORES:
                xs, ys = samples[a][key], samples[b][key]
                if len(xs) >= 2 and len(ys) >= 2:
                    p = float(ttest_ind(xs, ys, equal_var=False).pvalue)
                    tests.append(dict(a=a, b=b, score=key, n_a=len(xs), n_b=len(ys),
                                      p_value=p, meaningful=min(len(xs), len(ys)) >= MEANINGFUL_N))
    if tests:
        lines += ["", f"Welch's t-test p-values at step {at:,} (n per group beside each; "
                      f"* n < {MEANINGFUL_N} in a group: not meaningful):", "",
                  "| a | b | " + " | ".join(LABELS[k] for k in SCORES) + " |",
                  "|" + " --- |" * (2 + len(SCORES))]
        pairs = {}
        for t in tests:
            pairs.setdefault((t["a"], t["b"]), {})[t["score"]] = t
        for (a, b), by_score in pairs.items():
            lines.append(f"| {a} | {b} | " + " | ".join(
                (f"{t['p_value']:.2g} ({t['n_a']} v {t['n_b']})" + ("" if t["meaningful"]
                                                                     else " *"))
                if (t := by_score.get(k)) else "" for k in SCORES) + " |")
    return lines, rows, tests


def mean_std(samples):
    """Mean and sample standard deviation (n - 1; 0 for one sample)."""
    mean = sum(samples) / len(samples)
    if len(samples) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in samples) / (len(samples) - 1))


def mean_std_text(mean, std):
    """``427 ± 102``, ``14.9 ± 1.4``, ``0.59 ± 0.12``: the std to two significant digits (three
    from 100 up, no decimals), the mean to the same decimal place; a lone value to 4 digits."""
    if not std or not math.isfinite(std):
        return f"{mean:.4g}"
    decimals = max(0, 1 - math.floor(math.log10(abs(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def seeds_figure(at_step, path, at):
    """Per objective (rows) and seed (columns), the active latents x factor share matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = objectives(at_step)
    seeds = sorted({r.seed for r in at_step})
    fig, axes = plt.subplots(len(names), len(seeds), squeeze=False, layout="constrained",
                             figsize=(1.9 * len(seeds) + 1.6, 2.1 * len(names) + 1.0))
    panels = {(i, k): next((r for r in at_step if r.objective == objective and r.seed == seed),
                           None)
              for i, objective in enumerate(names) for k, seed in enumerate(seeds)}
    image = None
    for (i, k), run in panels.items():
        objective, seed, ax = names[i], seeds[k], axes[i, k]
        ax.set_xticks([])
        ax.set_yticks([])
        if run is None:
            ax.set_axis_off()
            continue
        rows = np.flatnonzero(run.active)
        if not len(rows):  # a collapsed run: nothing to draw, and the panel says so
            ax.text(0.5, 0.5, "no active\nlatent", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
            rows = []
        else:
            image = ax.imshow(run.shares[rows], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(rows)), [f"z{j}" for j in rows], fontsize=6)
        if all(panels[j, k] is None for j in range(i + 1, len(names))):  # the column's lowest
            ax.set_xticks(range(len(FACTOR_NAMES)), [FACTOR_LABELS[f] for f in FACTOR_NAMES],
                          rotation=60, fontsize=6, ha="right")
        if i == 0:
            ax.set_title(f"seed {seed}", fontsize=8)
        if k == 0:
            ax.set_ylabel(objective, fontsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.6)
        bar.set_label("share of the latent's variance", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"what each active latent learned at step {at:,} (factor shares)", fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def curves_figure(at_step, path, at):
    """FactorVAE score and MIG at every evaluation up to ``at``: per objective the mean over its
    seeds and their min-max band (steps every seed evaluated)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SCORES if any(k in r.curves for r in at_step)]
    if not keys:
        raise EvidenceError("no run has eval records with scores (metrics.jsonl); train with "
                            "--eval-metrics to get scores over training")
    fig, axes = plt.subplots(1, len(keys), squeeze=False, figsize=(4.2 * len(keys), 3.4))
    for ax, key in zip(axes[0], keys, strict=True):
        for objective in objectives(at_step):
            curves = [dict(r.curves[key]) for r in at_step
                      if r.objective == objective and key in r.curves]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[s] for s in steps] for c in curves])
            line, = ax.plot(steps, values.mean(axis=0), label=f"{objective} (n={len(curves)})")
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2,
                            color=line.get_color(), linewidth=0)
        ax.set_title(LABELS[key], fontsize=9)
        ax.set_xlabel("step")
        ax.set_xlim(0, at)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("scores over training: mean over the seeds, min-max band", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def wallclock(train, evals, span=SPAN):
    """One run's timing from its metrics.jsonl records: steps, ``seconds`` at its last record
    (wall-clock since its start, carried across resumes; it counts time the run was paused),
    its evaluations (n and their seconds) and the median span of ``span`` steps between the
    records at multiples of ``span`` (training with its one evaluation; the median leaves out
    the spans a pause stretched): the steady rate, from which ``steady_hours`` estimates the
    run's wall-clock unpaused. None for a run without training records."""
    if not train:
        return None
    seconds = {r["step"]: r["seconds"] for r in train}
    marks = [s for s in sorted(seconds) if s % span == 0]
    spans = sorted(seconds[b] - seconds[a] for a, b in zip(marks, marks[1:]) if b - a == span)
    median = (spans[(len(spans) - 1) // 2] + spans[len(spans) // 2]) / 2 if spans else None
    steps = train[-1]["step"]
    return dict(steps=steps, seconds=train[-1]["seconds"], evaluations=len(evals),
                eval_seconds=sum(e.get("eval_seconds", 0.0) for e in evals), spans=len(spans),
                span_median=median,
                steady_hours=None if median is None else median * steps / span / 3600)


def wallclock_table(folders, states):
    """(markdown lines, rows): per trial its wall-clock (``wallclock``), precision, threads,
    processor and resumes, from config.json and metrics.jsonl."""
    lines = ["| run | state | steps | precision, threads, processor | resumes | `seconds` at "
             f"the end | evaluations | median {SPAN:,}-step span | steady wall-clock |",
             "|" + " --- |" * 9]
    rows = []
    for folder in folders:
        record = folder.read_config()
        timing = wallclock(folder.records("train"), folder.records("eval"))
        if timing is None:
            continue
        device = (record.get("resumes") or [{}])[-1].get("device") or record.get("device") or {}
        row = dict(run=folder.name, state=states.get(folder.name),
                   precision=device.get("precision"), threads=device.get("torch_threads"),
                   processor=device.get("model") or device.get("cpu"),
                   used=device.get("used"), resumes=len(record.get("resumes") or []), **timing)
        rows.append(row)
        span = (f"{timing['span_median']:,.0f} s (of {timing['spans']})"
                if timing["span_median"] is not None else "")
        steady = (f"{timing['steady_hours']:.1f} h" if timing["steady_hours"] is not None
                  else "")
        lines.append(
            f"| {folder.name} | {row['state']} | {timing['steps']:,} | {row['precision']}, "
            f"{row['threads']}, {row['processor'] or row['used']} | {row['resumes']} | "
            f"{timing['seconds']:,.0f} s ({timing['seconds'] / 3600:.1f} h) | "
            f"{timing['evaluations']} ({timing['eval_seconds']:,.0f} s) | {span} | {steady} |")
    return lines, rows


def write_evidence(study_dir, out, at):
    """All of the above into ``out``; returns what was written, for the command's last line."""
    at_step, longer = collect(study_dir, at)
    claims, claim_rows = claims_table(at_step, longer, at)
    scores, score_rows, tests = scores_table(at_step, at)
    seeds = sorted({r.seed for r in at_step})
    about = (f"{len(at_step)} runs at step {at:,} (seeds {', '.join(map(str, seeds))}) of "
             f"{', '.join(objectives(at_step))}" + (
                 f"; {len(longer)} trained further" if longer else ""))
    (out / "claims.md").write_text(
        f"Claims decided by the rules of docs/results.md (plotting.CLAIMS) on each run's "
        f"ground-truth summary: {about}.\n\n" + "\n".join(claims) + "\n")
    (out / "claims.json").write_text(json.dumps(
        dict(step=at, rows=claim_rows, runs=[_run_record(r) for r in at_step + longer]),
        indent=2) + "\n")
    (out / "scores.md").write_text(
        f"Scores at step {at:,}: mean ± sample standard deviation over the seeds (n); "
        f"{about}. I_max over the evaluation's fixed sample.\n\n" + "\n".join(scores) + "\n")
    (out / "scores.json").write_text(json.dumps(dict(step=at, rows=score_rows, tests=tests),
                                                indent=2) + "\n")
    seeds_figure(at_step, out / "seeds.png", at)
    curves_figure(at_step, out / "scores_over_training.png", at)
    trials = study_trials(study_dir)
    folders = [RunFolder(Path(study_dir) / t["name"]) for t in trials
               if (Path(study_dir) / t["name"]).is_dir()]
    timing, timing_rows = wallclock_table(folders, {t["name"]: t.get("state") for t in trials})
    (out / "wallclock.md").write_text(
        "Wall-clock per trial, from each run's own records (metrics.jsonl's `seconds`: since "
        "the run's start, across resumes, counting time it was paused; the steady wall-clock is "
        f"the median {SPAN:,}-step span, training with its evaluation, times the steps, which "
        "leaves the pauses out). Precision, threads and processor as the run last started.\n\n"
        + "\n".join(timing) + "\n")
    (out / "wallclock.json").write_text(json.dumps(timing_rows, indent=2) + "\n")
    return (f"claims.md/.json, scores.md/.json, seeds.png, scores_over_training.png, "
            f"wallclock.md/.json ({about})")


def _run_record(run):
    return dict(run=run.name, objective=run.objective, objective_name=OBJECTIVE_NAMES.get(
        run.metric, run.metric), seed=run.seed, step=run.step, claims=run.claims,
        values=run.values, active=[int(j) for j in np.flatnonzero(run.active)],
        shares=np.round(run.shares, 4).tolist())
