"""study.py's local engine on tiny trials: the grid, idempotent reruns, the summary against the
runs' own files, a killed worker retried from its checkpoint, and bad specs refused up front."""
import csv
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import study
from conftest import ROOT, cmdline, no_data

TINY = ["--grid", "reduced", "--batch_size", "8", "--steps", "6", "--log-interval", "3",
        "--save-interval", "3", "--gt-interval", "6", "--eval-metrics", "mig", "--no-cuda",
        "--nb-test", "2", "--eval-sample", "200"]


def grid(out, *extra, data_dir):
    return ["--out", str(out), "--metric", "Test_gt", "VAE", "--seeds", "2", "--alpha", "5",
            "--omega", "0.9", *extra, "--", *TINY, "--data-dir", str(data_dir)]


def without_warnings(err):
    """stderr less its "warning: " lines (the few-records warning of these few-step runs)."""
    return "\n".join(line for line in err.strip().splitlines()
                     if not line.startswith("warning: "))


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    argv = grid(out, "--workers", "2", data_dir=no_data(out.parent))
    assert study.main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_the_summary_gives_each_seed_its_udr_among_its_configurations_seeds(finished):
    """UDR needs no labels (as Non-Syn VAE needs none): every configuration with two or more
    finished seeds gets it beside the supervised scores, recomputed here from the models."""
    import numpy as np

    from metrics import UDR_PROTOCOL, udr
    from representation import udr_inputs
    from runfolder import RunFolder
    out, _ = finished
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        folders = sorted(p for p in out.iterdir()
                         if p.is_dir() and p.name.startswith(row["metric"] + "_"))
        inputs, lowered = udr_inputs([RunFolder(f) for f in folders])
        assert [codes.shape for codes, _ in inputs] == [(1000, 10)] * 2 and not lowered
        scores, pairwise = udr([c for c, _ in inputs], [k for _, k in inputs],
                               UDR_PROTOCOL["alpha"], UDR_PROTOCOL["kl_filter_threshold"])
        assert float(row["udr_mean"]) == pytest.approx(np.mean(scores), rel=1e-6, abs=1e-12)
        assert scores == [pairwise[1, 0], pairwise[0, 1]]  # two seeds: each the other's pair
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[0].endswith("| UDR |")
    assert "UDR (Duan et al. 2020" in summary and "needs no labels" in summary


@pytest.mark.slow
def test_a_two_by_two_study_makes_four_runs_and_a_two_row_summary(finished):
    out, _ = finished
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["Test_gt_alpha5.0_omega0.9_seed1", "Test_gt_alpha5.0_omega0.9_seed2",
                     "VAE_seed1", "VAE_seed2"]
    state = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in state["trials"]] == ["finished"] * 4
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["metric"], r["n"]) for r in rows] == [("Test_gt", "2"), ("VAE", "2")]
    for row in rows:  # the summary's numbers, recomputed from the runs' own files
        folders = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith(row["metric"] + "_"))
        for name, source in (("recon", "measures"), ("i_max", "measures"), ("elbo", "measures"),
                             ("mig", "scores")):
            values = []
            for folder in folders:
                last = json.loads((folder / "metrics.json").read_text())["evaluations"][-1]
                values.append(last[source][name] if source == "measures"
                              else last[source][name]["score"])
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
            assert float(row[f"{name}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{name}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-15)
    assert {r["label"] for r in rows} == {"Non-Syn VAE (alpha 5, omega 0.9)", "VAE"}
    summary = (out / "summary.md").read_text()
    assert "| objective | n | recon | KL | ELBO | I_max (omega 0.9) | MIG |" in summary
    assert "| Non-Syn VAE (alpha 5, omega 0.9) | 2 | " in summary and "| VAE | 2 | " in summary
    assert not re.search(r"\de[+-]\d", summary)  # no 1e+02 in a table


@pytest.mark.slow
def test_rerunning_a_finished_study_changes_nothing_and_trains_nothing(finished):
    """The same command again starts no trial (its output says every trial is finished and
    runs none) and leaves every file as it was. (It used to assert a wall-clock bound of 5 s,
    which a rerun on 2 cores, 3-4 s of it importing torch and scipy, failed one time in three.)"""
    out, argv = finished
    before = digest(out)
    rerun = subprocess.run([sys.executable, str(ROOT / "study.py"), *argv], capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    output = rerun.stdout + rerun.stderr
    assert f"study {out}: 4 trials, 4 finished" in output and "running" not in output, output
    assert digest(out) == before


@pytest.mark.slow
def test_a_different_spec_for_the_same_folder_is_refused(finished, capsys):
    out, _ = finished
    before = digest(out)
    assert study.main(["--out", str(out), "--metric", "Factor", "--seeds", "1", "--", *TINY]) == 2
    assert "holds a study with another spec" in capsys.readouterr().err
    assert digest(out) == before


@pytest.mark.slow
def test_a_second_study_on_the_same_folder_is_refused_while_one_runs(finished, capsys):
    import fcntl
    out, argv = finished
    before = digest(out)
    with open(out / ".study.lock", "a") as held:  # as a running study.py holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert study.main(argv) == 2
    assert "another study.py is running the study in" in capsys.readouterr().err
    assert digest(out) == before


@pytest.mark.parametrize("argv, message", [
    (["--metric", "VAE", "--", "--omega", "2"], "run.py flag --omega (as run.py reads"),
    (["--metric", "Test_gt", "--", "--alph", "9"], "run.py flag --alpha (as run.py reads "
                                                    "'--alph 9') is an axis of the study"),
    (["--metric", "VAE", "--", "--alpha=9"], "run.py flag --alpha"),
    (["--metric", "VAE", "--", "--see", "3"], "run.py flag --seed"),
    (["--metric", "VAE", "--", "--metr", "Factor"], "run.py flag --metric"),
    (["--metric", "VAE", "--", "--arch", "2018"], "run.py flag --arch"),
    (["--metric", "VAE", "--", "--output-dir", "x"], "run.py flag --output_dir"),
    (["--metric", "VAE", "--", "--output_d", "x"], "run.py flag --output_dir"),
    (["--metric", "VAE", "--", "--run_name", "x"], "run.py flag --run_name"),
    (["--metric", "VAE", "--", "--res", "x"], "run.py flag --resume"),
    (["--metric", "VAE", "--", "--dry-run"], "run.py flag --dry_run"),
    (["--metric", "VAE", "--", "--dry"], "ambiguous option: --dry could match"),
    (["--metric", "VAE", "--", "-h"], "run.py flag --help"),
    (["--metric", "VAE", "--", "--he"], "run.py flag --help"),
    (["--metric", "VAE", "--seed", "1", "2", "1"], "axis seed lists 1 more than once"),
    (["--metric", "VAE", "VAE"], "axis metric lists VAE more than once"),
    (["--metric", "BVAE", "BVAE_gt"], "--metric BVAE and BVAE_gt are the same objective "
                                       "(beta-VAE) under two names"),
    (["--metric", "Test_gt", "VAE", "test"], "--metric Test_gt and test are the same"),
    (["--metric", "Test_gt", "--alpha", "5", "5.0"], "axis alpha lists 5.0 more than once"),
    (["--metric", "Test_gt", "--omega", "2"], "would be refused by run.py"),
    (["--metric", "VAE", "--", "--batch_size", "1"], "would be refused by run.py"),
    (["--metric", "VAE", "--", "--colour", "red"], "unrecognized arguments: --colour red"),
    (["--metric", "VAE", "--engine", "ray", "--workers", "2"], "--workers is for --engine local"),
    (["--metric", "VAE", "--gpus-per-trial", "0.5"], "--gpus-per-trial is for --engine ray"),
])
def test_bad_input_is_refused_before_any_trial_starts(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    try:
        code = study.main(["--out", str(out), *argv])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err  # argparse's own refusals too: no usage
    assert not out.exists()  # nothing written, not even study.json


@pytest.mark.slow
def test_trials_are_checked_in_process_as_run_py_dry_run_checks_them(tmp_path):
    """study.py checks its trials without a run.py process each; the settings it resolves and
    the line it quotes for a refusal are those of ``run.py ... --dry-run`` itself."""
    def spec_of(metric, *flags):
        return study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--metric",
                                                  metric, "--", "--grid", "reduced", *flags]))

    def dry_run(spec, trial):
        return subprocess.run([sys.executable, str(ROOT / "run.py"),
                               *study.trial_argv(spec, trial, tmp_path), "--dry-run"],
                              capture_output=True, text=True)
    spec = spec_of("DIPVAE2", "--steps", "1.5e5", "--batch-s", "32")  # abbreviated, as run.py reads
    trial = study.expand(spec)[0]
    printed = dry_run(spec, trial)
    assert printed.returncode == 0, printed.stderr
    assert study.check_trials(spec, [trial], tmp_path) == {
        trial["name"]: json.loads(printed.stdout.strip().splitlines()[-1])}
    for metric, *flags in (("VAE", "--batch_size", "1"), ("VAE", "--grid", "tiny"),
                           ("test", "--viz_on", "False")):  # argparse's refusals, then run.py's
        spec = spec_of(metric, *flags)
        trial = study.expand(spec)[0]
        refused = dry_run(spec, trial)
        assert refused.returncode == 2
        with pytest.raises(study.StudyError) as err:
            study.check_trials(spec, [trial], tmp_path)
        assert str(err.value) == (f"trial {trial['name']} would be refused by run.py: "
                                  f"{refused.stderr.strip().splitlines()[-1]}")


def test_unknown_or_empty_axes_in_a_spec_file_are_named(tmp_path, capsys):
    for spec, message in (({"metric": ["VAE"], "colour": [1]}, "unknown axis colour"),
                          ({"metric": ["VAE"], "seed": []}, "axis seed is empty"),
                          ([{"metric": ["VAE"]}], "must hold one JSON object"),
                          ({"metric": "VAE"}, "axis metric must be a list of values"),
                          ({"metric": ["VAE"], "seed": "1"}, "axis seed must be a list"),
                          ({"metric": ["VAE"], "seed": [1, 1]}, "axis seed lists 1 more"),
                          ({"metric": ["VAE"], "seed": [1.5]}, "axis seed: 1.5 is not a seed"),
                          ({"metric": ["Test_gt"], "alpha": ["5"]}, "axis alpha: '5' is not a"),
                          ({"metric": ["VAE"], "flags": "--steps 10"}, "flags must be a list"),
                          ({"metric": ["Test_gt"], "flags": ["--alph", "9"]},
                           "run.py flag --alpha (as run.py reads '--alph 9')"),
                          ({"metric": ["VAE"], "arch": {"VAE": ["2018", "2018"]}},
                           "axis arch lists 2018 more than once")):
        path = tmp_path / "spec.json"
        path.write_text(json.dumps(spec))
        with pytest.raises(SystemExit):
            study.main(["--out", str(tmp_path / "s"), "--spec", str(path)])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, spec
        assert not (tmp_path / "s").exists()


def test_a_spec_may_give_an_axis_per_objective(tmp_path, capsys):
    """The thesis's runs in one study: Non-Syn and FactorVAE with the 2018 decoder, VAE with
    the 2020 one; a per-objective value for an objective the study lacks, or a bad value, is
    named before anything is written."""
    def spec_of(spec):
        path = tmp_path / "spec.json"
        path.write_text(json.dumps(spec))
        return study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--spec",
                                                  str(path)]))
    spec = spec_of({"metric": ["Test_gt", "Factor", "VAE"], "alpha": [5.0],
                    "arch": {"Test_gt": ["2018"], "Factor": ["2018"], "VAE": ["2020", "2018"]}})
    trials = study.expand(spec)
    assert [t["name"] for t in trials] == [
        "Test_gt_alpha5.0_arch2018_seed1", "Factor_arch2018_seed1", "VAE_arch2020_seed1",
        "VAE_arch2018_seed1"]
    argv = study.trial_argv(spec, trials[2], tmp_path)
    assert argv[argv.index("--arch") + 1] == "2020"
    assert study.configuration(trials[2]) != study.configuration(trials[3])
    for bad, message in (({"metric": ["VAE"], "arch": {"Factor": ["2018"]}},
                          "axis arch for Factor: Factor is not among the study's objectives"),
                         ({"metric": ["VAE"], "arch": {"VAE": ["2019"]}},
                          "axis arch for VAE: '2019' is not one of 2020, 2018"),
                         ({"metric": ["VAE"], "arch": {"VAE": []}}, "axis arch for VAE is empty"),
                         ({"metric": ["VAE"], "alpha": 5}, "axis alpha must be a list of values")):
        with pytest.raises(SystemExit):
            spec_of(bad)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_objective_label_names_a_non_default_decoder():
    assert study.objective_label({"metric": "VAE", "arch": "2018"}) == "VAE (arch 2018)"
    assert study.objective_label({"metric": "VAE", "arch": "2020"}) == "VAE"


def test_a_label_names_every_setting_that_makes_another_model():
    """Two runs titled alike have the same objective settings: AnnealedVAE's c_steps and
    c_gamma, FactorVAE's discriminator optimiser, the initialisation, decoder, precision."""
    label = study.objective_label
    assert label({"metric": "AnnealedVAE"}) == "AnnealedVAE (c_max 25)"
    assert label({"metric": "AnnealedVAE", "c_steps": 5000, "c_gamma": 100.0}) == (
        "AnnealedVAE (c_max 25, c_steps 5000, c_gamma 100)")
    assert label({"metric": "Factor", "gamma": 10.0, "lr_D": 2e-4}) == (
        "FactorVAE (gamma 10, lr_D 0.0002)")
    assert label({"metric": "VAE", "init": "current", "batch_size": 32,
                  "precision": "bf16"}) == "VAE (init current, bf16)"
    assert label({"metric": "Test_gt", "alpha": 5.0, "omega": 0.9, "update": "joint",
                  "arch": "2018"}) == "Non-Syn VAE (alpha 5, omega 0.9, update joint, arch 2018)"


KILL_FLAGS = ["--grid", "reduced", "--batch_size", "8", "--steps", "60", "--log-interval", "5",
              "--save-interval", "5", "--gt-interval", "1000", "--eval-metrics", "none",
              "--no-cuda", "--nb-test", "2", "--eval-sample", "200"]


def one_trial(out, *engine):
    return ["--out", str(out), "--metric", "Test_gt", "--seed", "3", *engine, "--",
            *KILL_FLAGS, "--data-dir", str(no_data(out.parent))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted trial's final weights."""
    out = tmp_path_factory.mktemp("straight") / "s"
    assert study.main(one_trial(out)) == 0
    return torch.load(out / "Test_gt_seed3/checkpoints/last.pt", weights_only=True)["model"]


def wait_for(condition, seconds=180):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def run_py_pids(out, marker="run.py"):
    """PIDs of the run.py processes of the study in ``out`` (whose command line holds
    ``marker``)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and str(out) in cmdline(p)
            and "run.py" in cmdline(p) and marker in cmdline(p)]


def has_records(log):
    return log.exists() and log.stat().st_size > 0


def kill_mid_trial(out, *engine):
    """Start the one-trial study, SIGKILL its run.py after its first checkpoint, and return the
    study's output once it has ended."""
    process = subprocess.Popen([sys.executable, str(ROOT / "study.py"), *one_trial(out, *engine)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = out / "Test_gt_seed3" / "checkpoints" / "last.pt"
    wait_for(checkpoint.exists)
    victims = run_py_pids(out, "--run-name\0Test_gt_seed3")
    assert victims, "the trial's run.py process was not found"
    os.kill(victims[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def assert_resumed(out, straight, output):
    trial = json.loads((out / "study.json").read_text())["trials"][0]
    assert trial["state"] == "finished" and trial["attempts"] == 2, output
    assert "failed Test_gt_seed3 (attempt 1): run.py was killed by SIGKILL; retrying" in output
    assert "Resuming" in (out / ".Test_gt_seed3.log").read_text()  # not restarted
    resumed = torch.load(out / "Test_gt_seed3/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_ends_as_an_uninterrupted_trial(tmp_path, straight):
    out = tmp_path / "killed"
    assert_resumed(out, straight, kill_mid_trial(out))


@pytest.mark.slow
def test_a_killed_study_stops_its_trials_with_a_checkpoint_and_resumes_them(tmp_path, straight):
    out = tmp_path / "orphaned"
    process = subprocess.Popen([sys.executable, str(ROOT / "study.py"), *one_trial(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "Test_gt_seed3" / "checkpoints" / "last.pt"
    wait_for(checkpoint.exists)
    trial = run_py_pids(out)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    wait_for(lambda: not any(cmdline(p) for p in trial), seconds=60)
    assert trial and not any(cmdline(p) for p in trial), "the trial outlived its study"
    assert "python run.py --resume" in (out / ".Test_gt_seed3.log").read_text()  # SIGTERM, saved
    assert study.main(one_trial(out)) == 0  # the same command resumes it
    resumed = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_a_trial_killed_before_its_first_checkpoint_starts_again_keeping_its_files(tmp_path):
    out = tmp_path / "early"
    argv = ["--out", str(out), "--metric", "VAE", "--", *KILL_FLAGS, "--save-interval", "1000",
            "--data-dir", str(no_data(tmp_path))]  # no checkpoint before the end
    process = subprocess.Popen([sys.executable, str(ROOT / "study.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "VAE_seed1" / "metrics.jsonl"
    wait_for(lambda: has_records(log))
    os.kill(run_py_pids(out)[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    kept = [p for p in out.iterdir() if p.name.startswith(".VAE_seed1.unfinished-")]
    assert len(kept) == 1 and (kept[0] / "metrics.jsonl").read_text()
    assert json.loads((out / "study.json").read_text())["trials"][0]["state"] == "finished"


@pytest.mark.slow
def test_a_crashing_trial_is_marked_failed_with_its_reason_and_the_others_go_on(tmp_path,
                                                                               capsys):
    out = tmp_path / "crash"  # alpha 1e300 makes the Non-Syn loss infinite: run.py stops, exit 3
    argv = ["--out", str(out), "--metric", "Test_gt", "VAE", "--alpha", "1e300", "--retries", "1",
            "--", *TINY, "--data-dir", str(no_data(tmp_path))]
    assert study.main(argv) == 1
    captured = capsys.readouterr()
    assert "1 trial(s) failed" in captured.err
    trials = {t["name"]: t for t in json.loads((out / "study.json").read_text())["trials"]}
    crashed = trials["Test_gt_alpha1e+300_seed1"]
    assert crashed["state"] == "failed" and crashed["attempts"] == 2
    assert crashed["reason"].startswith("run.py exited with 3 (diverged, disk full or out of memory): ")
    assert crashed["log_tail"] and trials["VAE_seed1"]["state"] == "finished"
    assert "failed Test_gt_alpha1e+300_seed1 (attempt 2): run.py exited with 3" in captured.out
    summary = (out / "summary.md").read_text()
    assert "| VAE | 1 |" in summary and "1 trial(s) have not finished" in summary


@pytest.mark.slow
def test_welch_tests_and_curves_come_from_the_runs_files(finished):
    from scipy.stats import ttest_ind
    out, _ = finished
    with open(out / "ttests.csv") as f:
        tests = {(r["a"], r["b"], r["measure"]): r for r in csv.DictReader(f)}
    finals = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        finals.setdefault(folder.name.split("_seed")[0], []).append(json.loads(
            (folder / "metrics.json").read_text())["evaluations"][-1]["measures"]["i_max"])
    test = tests[("Non-Syn VAE (alpha 5, omega 0.9)", "VAE", "i_max")]
    expected = ttest_ind(finals["Test_gt_alpha5.0_omega0.9"], finals["VAE"], equal_var=False)
    assert float(test["p_value"]) == pytest.approx(expected.pvalue, rel=1e-9)
    assert (test["n_a"], test["n_b"]) == ("2", "2")
    assert "Welch's t-test" in (out / "summary.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("gpus, kw, expected", [
    ([], {}, (2, 1, [None, None])),                       # 2 cores: 2 workers x 1 thread
    ([], dict(threads=2), (1, 2, [None])),
    (["0"], dict(per_gpu=3), (3, 1, ["0", "0", "0"])),    # (cores 4 below)
    (["0", "1"], {}, (2, 2, ["0", "1"])),
    (["4", "7"], dict(per_gpu=2), (4, 1, ["4", "4", "7", "7"])),
])
def test_local_placement_packs_gpus_and_never_oversubscribes(gpus, kw, expected):
    plan = study.plan_local(4 if gpus else 2, gpus, **kw)
    assert (plan.workers, plan.threads, plan.devices) == (expected[0], expected[1], expected[2])


@pytest.mark.parametrize("gpus, kw, message", [
    ([], dict(workers=2, threads=2), "exceed the 2 CPUs this process may use"),
    ([], dict(per_gpu=2), "no GPU is visible"),
    (["0"], dict(per_gpu=2, cuda=False), "--no-cuda"),
    (["0"], dict(per_gpu=1, workers=2), "exceeds 1 GPU(s) x --trials-per-gpu 1"),
])
def test_bad_placements_are_refused(gpus, kw, message):
    with pytest.raises(study.StudyError, match=re.escape(message)):
        study.plan_local(2, gpus, **kw)


@pytest.mark.slow
def test_engine_ray_without_ray_names_the_install_command(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; sys.path.insert(0, {root!r}); import study; "
            "sys.exit(study.main(['--out', {out!r}, '--engine', 'ray', '--metric', 'VAE']))")
    result = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT),
                                                               out=str(tmp_path / "s"))],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "pip install -r requirements-ray.txt" in result.stderr
    assert not (tmp_path / "s").exists()


def without_clock(folder):
    rows_ = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")} for r in rows_]


@pytest.mark.slow
def test_the_ray_engine_makes_the_same_run_folders_as_the_local_one(finished, tmp_path):
    pytest.importorskip("ray", reason="the Ray extra is not installed (requirements-ray.txt)")
    local, argv = finished
    out = tmp_path / "ray"
    argv = [str(out) if a == str(local) else a for a in argv]
    cut = argv.index("--workers")
    argv[cut:cut + 2] = ["--engine", "ray"]  # Ray places them itself, one CPU each
    cut = argv.index("--seeds")
    argv[cut:cut + 2] = ["--seed", "1"]  # two of the four trials: both at once on 2 CPUs
    result = subprocess.run([sys.executable, str(ROOT / "study.py"), *argv],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished VAE_seed1:" in result.stdout
    trials = json.loads((out / "study.json").read_text())["trials"]
    assert [t["name"] for t in trials] == ["Test_gt_alpha5.0_omega0.9_seed1", "VAE_seed1"]
    assert [t["state"] for t in trials] == ["finished"] * 2
    for trial in trials:
        ours, theirs = without_clock(out / trial["name"]), without_clock(local / trial["name"])
        assert ours == theirs and len(ours) > 2, trial["name"]
    assert list((out / ".ray").iterdir()), "Ray's own storage is not in the study folder"


@pytest.mark.slow
def test_a_trial_killed_under_ray_is_retried_and_resumes_from_its_checkpoint(tmp_path, straight):
    pytest.importorskip("ray", reason="the Ray extra is not installed (requirements-ray.txt)")
    out = tmp_path / "killed"
    assert_resumed(out, straight, kill_mid_trial(out, "--engine", "ray"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_ctrl_c_stops_the_study_with_checkpoints_and_the_same_command_resumes(tmp_path, engine):
    if engine == "ray":
        pytest.importorskip("ray", reason="the Ray extra is not installed (requirements-ray.txt)")
    out = tmp_path / "s"
    argv = [sys.executable, str(ROOT / "study.py"), "--out", str(out), "--metric", "VAE",
            "--engine", engine, "--", "--grid", "reduced", "--batch_size", "8", "--steps", "400",
            "--log-interval", "5", "--save-interval", "200", "--eval-metrics", "none",
            "--eval-sample", "200", "--no-cuda", "--nb-test", "2",
            "--data-dir", str(no_data(tmp_path))]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "VAE_seed1" / "metrics.jsonl"
    wait_for(lambda: has_records(log))
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    assert "Resume with the same command" in output
    trial = json.loads((out / "study.json").read_text())["trials"][0]
    assert trial["state"] == "pending", trial
    assert "checkpoint saved" in (out / ".VAE_seed1.log").read_text()  # run.py got SIGTERM
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming" in (out / ".VAE_seed1.log").read_text()


@pytest.mark.slow
def test_relative_paths_mean_what_they_mean_where_the_study_was_started(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_data(tmp_path)
    assert study.main(["--out", "rel", "--metric", "VAE", "--", *TINY, "--data-dir", "no-data"]) == 0
    assert (tmp_path / "rel" / "VAE_seed1" / "metrics.jsonl").exists()
    assert not (ROOT / "rel").exists()


@pytest.mark.slow
def test_extend_adds_seeds_and_runs_only_the_new_trials(finished, tmp_path):
    import shutil
    local, argv = finished
    out = tmp_path / "extended"
    shutil.copytree(local, out)
    before = digest(out / "VAE_seed1")
    argv = [str(out) if a == str(local) else a for a in argv]
    grown = [("3" if a == "2" and argv[i - 1] == "--seeds" else a) for i, a in enumerate(argv)]
    assert study.main(grown) == 2  # a bigger grid without --extend is another spec
    cut = grown.index("--")
    assert study.main(grown[:cut] + ["--extend"] + grown[cut:]) == 0
    trials = json.loads((out / "study.json").read_text())["trials"]
    assert {t["name"]: t["attempts"] for t in trials} == {
        "Test_gt_alpha5.0_omega0.9_seed1": 1, "Test_gt_alpha5.0_omega0.9_seed2": 1,
        "Test_gt_alpha5.0_omega0.9_seed3": 1, "VAE_seed1": 1, "VAE_seed2": 1, "VAE_seed3": 1}
    assert digest(out / "VAE_seed1") == before  # finished trials untouched
    with open(out / "summary.csv") as f:
        assert [r["n"] for r in csv.DictReader(f)] == ["3", "3"]


def test_default_workers_count_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    from utils import usable_cpus
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs on an ancestor
    (v2 / "job" / "step" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    assert usable_cpus(v2, proc) == 2
    (v2 / "job" / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(v2, proc) == 6  # no quota: the affinity mask
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "slurm").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "slurm" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct" / "slurm" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/slurm\n")
    assert usable_cpus(v1, proc) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert usable_cpus(v1, proc) == 1  # taskset -c 3
    plan = study.plan_local(usable_cpus(v1, proc), [])
    assert (plan.workers, plan.threads) == (1, 1)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_study_under_taskset_plans_one_worker_per_allowed_cpu(tmp_path):
    """The real process: pinned to one CPU, study.py's default plan is one worker."""
    code = ("import os, sys; sys.path.insert(0, %r); os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "import study; from utils import usable_cpus\n"
            "plan = study.plan_local(usable_cpus(), [])\n"
            "print(usable_cpus(), plan.workers, plan.threads)") % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1"]


# --- study.json that lies, disk full ----------------------------------------------------------

def copy_of(finished, tmp_path):
    import shutil
    out, argv = finished
    shutil.copytree(out, tmp_path / "s")
    return tmp_path / "s", [tmp_path / "s" if a == str(out) else a for a in argv]


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["link", "copy"])
def test_a_trial_folder_holding_another_run_is_named_and_not_counted(finished, tmp_path, capsys,
                                                                      swap):
    """A trial's folder replaced by (a link to) another objective's run was counted finished
    and its numbers entered the summary; now one line names the trial and the settings."""
    import shutil
    out, argv = copy_of(finished, tmp_path)
    argv = [str(a) for a in argv]
    shutil.rmtree(out / "VAE_seed2")
    other = out / "Test_gt_alpha5.0_omega0.9_seed1"
    if swap == "link":
        (out / "VAE_seed2").symlink_to(other, target_is_directory=True)
    else:
        shutil.copytree(other, out / "VAE_seed2")
    before = digest(out)
    assert study.main(argv) == 2
    err = without_warnings(capsys.readouterr().err)
    assert len(err.splitlines()) == 1, err
    assert "trial VAE_seed2: its folder" in err and "holds another run (metric 'Test_gt' " \
        "(the trial's: 'VAE')" in err
    assert digest(out) == before


def test_the_trial_folder_check_reads_settings_as_their_format_implies(tmp_path):
    """check_trial_folders compares config.json (completed with the settings older formats
    imply, and the steps a resume set) with the trial's flags; paths are not compared."""
    spec = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--metric", "VAE",
                                              "--seeds", "1", "--", "--steps", "40"]))
    trials = study.expand(spec)
    configs = study.check_trials(spec, trials, tmp_path / "s")
    folder = tmp_path / "s" / "VAE_seed1"
    folder.mkdir(parents=True)
    own = dict(configs["VAE_seed1"], output_dir="elsewhere", steps=20)
    for name in ("precision", "measure_omega", "c_max"):  # as a format-2 run wrote it
        own.pop(name)
    (folder / "config.json").write_text(json.dumps(
        {"config": own, "resumes": [{"step": 20, "changed": {"steps": 40}}]}))
    study.check_trial_folders(tmp_path / "s", trials, configs)  # its own run: no complaint
    (folder / "config.json").write_text(json.dumps({"config": dict(own, seed=2, steps=40)}))
    with pytest.raises(study.StudyError, match="seed 2 \\(the trial's: 1\\)"):
        study.check_trial_folders(tmp_path / "s", trials, configs)
    (folder / "config.json").write_text("{\"config\": ")
    with pytest.raises(study.StudyError, match="config.json is not readable"):
        study.check_trial_folders(tmp_path / "s", trials, configs)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "a list", "edited state",
                                    "trial removed"])
def test_an_unreadable_study_json_is_named_with_the_way_to_recover(finished, tmp_path, capsys,
                                                                    damage):
    out, argv = copy_of(finished, tmp_path)
    argv = [str(a) for a in argv]
    path = out / "study.json"
    text = path.read_text()
    data = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "a list":
        path.write_text("[]")
    elif damage == "edited state":
        data["trials"][0]["state"] = "done"
        path.write_text(json.dumps(data))
    else:
        data["trials"].pop()
        path.write_text(json.dumps(data))
    before = digest(out)
    assert study.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path} is unreadable" in err, err
    assert "--summary" in err and "--rebuild" in err
    assert digest(out) == before
    # the summary still reads the run folders
    (out / "summary.md").unlink()
    assert study.main(["--out", str(out), "--summary"]) == 0
    assert "| Non-Syn VAE (alpha 5, omega 0.9) | 2 | " in (out / "summary.md").read_text()
    # --rebuild sets the file aside and takes the states from the run folders: nothing reruns
    runs = {name: digest(out / name) for name in ("VAE_seed1", "VAE_seed2")}
    started = time.monotonic()
    assert study.main([*argv[:argv.index("--")], "--rebuild", *argv[argv.index("--"):]]) == 0
    assert time.monotonic() - started < 20
    rebuilt = json.loads(path.read_text())
    assert [t["state"] for t in rebuilt["trials"]] == ["finished"] * 4
    assert {name: digest(out / name) for name in runs} == runs
    assert len(list(out.glob("study.json.unreadable-*"))) == 1


@pytest.mark.slow
def test_a_trial_recorded_finished_without_its_final_checkpoint_runs_again(finished, tmp_path):
    import shutil
    out, argv = copy_of(finished, tmp_path)
    argv = [str(a) for a in argv]
    shutil.rmtree(out / "VAE_seed2")  # study.json still says finished
    assert study.main(argv) == 0
    assert json.loads((out / "VAE_seed2/checkpoints").parent.joinpath(
        "config.json").read_text())["config"]["seed"] == 2
    assert torch.load(out / "VAE_seed2/checkpoints/last.pt", weights_only=True)["step"] == 6


@pytest.mark.slow
def test_disk_full_while_writing_the_study_is_one_line_and_exit_3(finished, tmp_path, capsys,
                                                                   monkeypatch):
    import errno
    from utils import disk_full_named
    out, argv = copy_of(finished, tmp_path)
    argv = [str(a) for a in argv]
    (out / "summary.md").unlink()  # the summary must be written again: the disk is full

    def full(path, data):
        with disk_full_named(path):
            raise OSError(errno.ENOSPC, "No space left on device")
    before = digest(out)
    monkeypatch.setattr(study, "atomic_write_bytes", full)
    assert study.main(argv) == 3
    err = without_warnings(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "no space left on device while writing" in err, err
    assert "summary.md" in err and "run the same study.py command again" in err
    assert digest(out) == before
    # study.json itself: a grown study cannot be recorded, and no trial starts
    monkeypatch.setattr(study, "write_json", lambda path, obj: full(path, b""))
    grown = [("3" if a == "2" and argv[i - 1] == "--seeds" else a) for i, a in enumerate(argv)]
    grown.insert(grown.index("--"), "--extend")
    assert study.main(grown) == 3
    err = without_warnings(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "study.json of the study" in err, err
    assert digest(out) == before and not (out / "VAE_seed3").exists()


def test_the_figures_preset_is_the_thesis_figures_runs(tmp_path):
    """``--preset figures``: Non-Syn (alpha 5, omega 0.9) and FactorVAE (gamma 6.4) with the
    2018 decoder, VAE with the 2020 one, seed 1, the thesis's 110,000 steps with a traversal
    every 2,000 and the ground truth every 5,000; shared flags after ``--`` override its length,
    ``--precision`` makes it a bf16 study."""
    spec = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--preset",
                                              "figures", "--", "--steps", "50000"]))
    trials = study.expand(spec)
    assert [t["name"] for t in trials] == ["Test_gt_alpha5.0_omega0.9_arch2018_seed1",
                                           "Factor_gamma6.4_arch2018_seed1", "VAE_arch2020_seed1"]
    for trial in trials:
        argv = study.trial_argv(spec, trial, tmp_path)
        config = run_dry(argv)
        assert config["steps"] == 50000 and config["save_interval"] == 2000
        assert config["gt_interval"] == 5000 and config["log_interval"] == 20
        assert config["seed"] == 1 and config["precision"] == "fp32"
        assert config["arch"] == ("2020" if trial["metric"] == "VAE" else "2018")
    assert run_dry(study.trial_argv(spec, trials[0], tmp_path))["alpha"] == 5.0
    bf16 = study.make_spec(*study.parse_args(["--out", str(tmp_path / "b"), "--preset",
                                              "figures", "--precision", "bf16"]))
    assert all(t["name"].endswith("_bf16_arch2018_seed1") or t["name"] ==
               "VAE_bf16_arch2020_seed1" for t in study.expand(bf16))
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()


def test_the_evidence_preset_is_five_seeds_with_seed_1_to_the_thesis_length(tmp_path,
                                                                             monkeypatch):
    """``--preset evidence``: the figures' three runs (bf16) over seeds 2-5 to 50,000 steps with
    the ground truth every 5,000, a traversal every 10,000 and a record every 100, and seed 1 to
    110,000 with a traversal every 2,000, 20-step records and its 50,000-step checkpoint kept
    (scored there like the others' final ones); Non-Syn and FactorVAE's seeds come
    first, then the VAE's, then seed 1's. Flags after ``--`` win over both."""
    import precision  # plan as on a CPU with native bf16 (this one may lack it: checked below)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    spec = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--preset",
                                              "evidence"]))
    names = [t["name"] for t in study.expand(spec)]
    nonsyn = "Test_gt_alpha5.0_omega0.9_bf16_arch2018"
    factor, vae = "Factor_gamma6.4_bf16_arch2018", "VAE_bf16_arch2020"
    assert names == ([f"{nonsyn}_seed{s}" for s in (2, 3, 4, 5)]
                     + [f"{factor}_seed{s}" for s in (2, 3, 4, 5)]
                     + [f"{vae}_seed{s}" for s in (2, 3, 4, 5)]
                     + [f"{nonsyn}_seed1", f"{factor}_seed1", f"{vae}_seed1"])
    configs = study.check_trials(spec, study.expand(spec), tmp_path / "s")
    for name, config in configs.items():
        seed1 = name.endswith("_seed1")
        assert (config["steps"], config["save_interval"], config["log_interval"],
                config["keep_interval"]) == (
            (110000, 2000, 20, 50000) if seed1 else (50000, 10000, 100, 0)), name
        assert config["gt_interval"] == 5000 and config["precision"] == "bf16"
        assert config["arch"] == ("2020" if name.startswith("VAE") else "2018")
        assert config["seed"] == int(name.rsplit("seed", 1)[1])
    short = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--preset",
                                               "evidence", "--", "--steps", "40"]))
    assert {c["steps"] for c in study.check_trials(short, study.expand(short),
                                                   tmp_path / "s").values()} == {40}
    narrowed = study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--preset",
                                                  "evidence", "--seed", "2", "3"]))
    assert "seed_flags" not in narrowed and len(study.expand(narrowed)) == 6
    assert not (tmp_path / "s").exists()


def test_seed_flags_in_a_spec_file_are_checked_like_flags(tmp_path, capsys):
    """A spec file's seed_flags give one seed's trials their own run.py flags (after the
    spec's); a bad entry, a seed the study lacks, or a flag the study owns is one line."""
    path = tmp_path / "spec.json"

    def spec_of(spec):
        path.write_text(json.dumps(spec))
        return study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--spec",
                                                  str(path)]))
    spec = spec_of({"metric": ["VAE"], "seed": [1, 2], "flags": ["--steps", "30"],
                    "seed_flags": {"2": ["--steps", "60"]}})
    assert [(t["name"], run_dry(study.trial_argv(spec, t, tmp_path))["steps"])
            for t in study.expand(spec)] == [("VAE_seed1", 30), ("VAE_seed2", 60)]
    for bad, message in (({"metric": ["VAE"], "seed_flags": ["--steps", "5"]},
                          "seed_flags must be {seed: [run.py flags]}"),
                         ({"metric": ["VAE"], "seed_flags": {"1": "--steps 5"}},
                          "seed_flags for seed 1 must be a list"),
                         ({"metric": ["VAE"], "seed_flags": {"7": ["--steps", "5"]}},
                          "seed_flags names seed 7, which is not among the study's seeds"),
                         ({"metric": ["VAE"], "seed_flags": {"1": ["--beta", "5"]}},
                          "run.py flag --beta")):
        with pytest.raises(SystemExit):
            spec_of(bad)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (bad, err)
    assert not (tmp_path / "s").exists()


def run_dry(argv):
    """The settings run.py resolves for a trial's argv (its own parser; nothing written)."""
    import run
    parser = run.build_parser()
    return run.make_config(parser.parse_args(argv), run.explicit_flags(parser, argv)).to_dict()


@pytest.mark.slow
def test_a_stopped_study_with_pending_trials_ends_and_resumes_them(tmp_path):
    """SIGTERM to a study whose queue still holds trials: the running trial stops with a
    checkpoint, the study ends (exit 130; it used to wait forever on the pending ones), and the
    same command then runs both to the end."""
    out = tmp_path / "queued"
    argv = ["--out", str(out), "--metric", "Test_gt", "--seed", "3", "4", "--workers", "1",
            "--", *KILL_FLAGS, "--data-dir", str(no_data(tmp_path))]
    process = subprocess.Popen([sys.executable, str(ROOT / "study.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for((out / "Test_gt_seed3" / "checkpoints" / "last.pt").exists)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    states = {t["name"]: t["state"] for t in json.loads((out / "study.json").read_text())["trials"]}
    assert states == {"Test_gt_seed3": "pending", "Test_gt_seed4": "pending"}, output
    assert not run_py_pids(out)
    assert study.main(argv) == 0
    states = {t["name"]: t["state"] for t in json.loads((out / "study.json").read_text())["trials"]}
    assert set(states.values()) == {"finished"}
    assert "Resuming" in (out / ".Test_gt_seed3.log").read_text()


@pytest.mark.slow
def test_rebuild_with_other_flags_adopts_only_the_folders_that_match_and_keeps_attempts(
        finished, tmp_path, capsys):
    """--rebuild adopts the spec given now: folders whose settings differ from their trial's
    (here 6-step runs for 8-step trials) are refused by name with nothing changed; a setting a
    resume may change adopts them as finished. The replaced study.json is kept beside, its
    attempt counts carried over."""
    out, argv = copy_of(finished, tmp_path)
    argv = [str(a) for a in argv]
    path = out / "study.json"
    data = json.loads(path.read_text())
    data["trials"][0]["attempts"] = 2
    path.write_text(json.dumps(data))
    before = digest(out)
    cut = argv.index("--")
    assert study.main([*argv[:cut], "--rebuild", *argv[cut:], "--steps", "8"]) == 2
    err = without_warnings(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "holds another run (steps 6 (the trial's: 8))" in err
    assert digest(out) == before
    assert study.main([*argv[:cut], "--rebuild", *argv[cut:], "--log-interval", "2"]) == 0
    rebuilt = json.loads(path.read_text())
    assert [t["state"] for t in rebuilt["trials"]] == ["finished"] * 4
    assert rebuilt["trials"][0]["attempts"] == 2
    assert rebuilt["spec"]["flags"][-2:] == ["--log-interval", "2"]
    (kept,) = out.glob("study.json.replaced-*")
    assert json.loads(kept.read_text()) == data
    assert "set aside as study.json.replaced-" in capsys.readouterr().err


def test_rebuild_carries_attempts_and_failure_reasons_of_a_readable_study_json(tmp_path, capsys):
    old = {"metric": ["VAE"], "seed": [1, 2], "flags": ["--steps", "5"]}
    trials = [dict(t, state=state, attempts=3, reason=f"why {t['seed']}", log_tail="tail")
              for t, state in zip(study.expand(old), ["failed", "running"])]
    (tmp_path / "study.json").write_text(json.dumps(dict(spec=old, trials=trials)))
    s = study.Study(tmp_path)
    s.rebuild()
    new = dict(old, flags=["--steps", "7"])
    s.adopt(new)
    adopted = json.loads((tmp_path / "study.json").read_text())
    assert adopted["spec"] == new
    assert [(t["state"], t["attempts"], t["reason"]) for t in adopted["trials"]] == [
        ("failed", 3, "why 1"), ("pending", 3, "why 2")]
    assert len(list(tmp_path.glob("study.json.replaced-*"))) == 1


def test_a_study_that_trained_nothing_takes_a_corrected_spec(tmp_path, capsys):
    """Every trial failed at start-up (no run folder): the corrected command is accepted, the
    old study.json kept beside; once a trial has a run folder, another spec is refused."""
    old = {"metric": ["VAE"], "seed": [1], "flags": ["--steps", "5", "--lr_VAE", "1e9"]}
    trials = [dict(t, state="failed", attempts=3, reason="exit 2", log_tail=None)
              for t in study.expand(old)]
    (tmp_path / "study.json").write_text(json.dumps(dict(spec=old, trials=trials)))
    s = study.Study(tmp_path)
    new = dict(old, flags=["--steps", "5"])
    s.check_spec(new, extend=False)
    s.adopt(new)
    assert json.loads((tmp_path / "study.json").read_text())["spec"] == new
    assert len(list(tmp_path.glob("study.json.replaced-*"))) == 1
    assert "its spec is replaced" in capsys.readouterr().err
    (tmp_path / "VAE_seed1").mkdir()
    (tmp_path / "VAE_seed1" / "config.json").write_text("{}")
    with pytest.raises(study.StudyError, match="holds a study with another spec"):
        study.Study(tmp_path).check_spec(old, extend=False)


def test_a_study_with_few_records_per_run_logs_more_often_or_names_the_flag(tmp_path, capsys):
    """--steps 300 at the default --log-interval 500 drew an empty curves.png without a word."""
    def spec_of(*flags):
        return study.make_spec(*study.parse_args(["--out", str(tmp_path / "s"), "--metric",
                                                  "VAE", "--", "--grid", "reduced", *flags]))
    folder = study.Study(tmp_path / "s")
    spec, configs = study.scale_records(spec_of("--steps", "300"), folder, None)
    assert spec["flags"][-2:] == ["--log-interval", "30"]
    assert {c["log_interval"] for c in configs.values()} == {30}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would log 0 training record(s) per run; logging every 30 " \
        "steps instead (10 records" in err
    assert study.scale_records(spec_of("--steps", "300"), folder, None)[0] == spec  # resumable
    capsys.readouterr()
    explicit = spec_of("--steps", "300", "--log-interval", "100")
    assert study.scale_records(explicit, folder, None)[0] == explicit
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 of 1 trials will log 3 training record(s)") and \
        "add -- --log-interval 30" in err
    enough = spec_of("--steps", "5000")
    assert study.scale_records(enough, folder, None)[0] == enough
    assert capsys.readouterr().err == ""


def _fake_trial(out, metric, seed, scores, i_max):
    name = f"{metric}_seed{seed}"
    (out / name).mkdir(parents=True)
    (out / name / "metrics.json").write_text(json.dumps({"evaluations": [{
        "step": 10, "scores": scores,
        "measures": {"recon": 1.0, "kl": 2.0, "elbo": -3.0, "i_max": i_max,
                     "measure_omega": 0.9}}]}))
    return dict(name=name, metric=metric, seed=seed, settings={}, state="finished")


def test_the_summary_marks_welch_tests_of_few_seeds_and_says_why_a_score_is_zero(tmp_path):
    """p = 0.0013 from n = 2 seeds was printed without a caveat, and AnnealedVAE's FactorVAE
    score as a bare 0."""
    out = tmp_path / "s"
    collapsed = {"score": 0.0, "num_active": 0, "protocol": {"prune_std": 0.05}}
    trials = [_fake_trial(out, "Test_gt", s, {"mig": {"score": 0.1 * s}}, 1.0 + 0.1 * s)
              for s in (1, 2)]
    trials += [_fake_trial(out, "AnnealedVAE", s, {"mig": {"score": 0.05 * s},
                                                   "factor_vae": collapsed}, 3.0 + 0.2 * s)
               for s in (1, 2)]
    folder = study.Study(out, read=False)
    folder.data = dict(spec=None, trials=trials)
    study.summarise(folder)
    summary = (out / "summary.md").read_text()
    assert "| a | b | n |" in summary
    assert re.search(r"\| Non-Syn VAE \(alpha 1.5, omega 0.8\) \| AnnealedVAE \(c_max 25\) \| "
                     r"2/2 \| undefined \(no spread\) \| [^|]+ \| [^|]+ \| [^|]+ † \|", summary), summary
    assert "† fewer than 3 seeds in a group" in summary and "not meaningful" in summary
    assert "| 0 [1] |" in summary
    assert "[1] FactorVAE score of AnnealedVAE (c_max 25): 0 by definition: no latent's " \
        "standard deviation reaches prune_std 0.05" in summary and "(2 of 2 seeds)" in summary
    with open(out / "ttests.csv") as f:
        assert {r["meaningful"] for r in csv.DictReader(f)} == {"False"}


@pytest.mark.slow
def test_finished_trials_carried_to_another_machine_are_imported_not_trained(tmp_path, capsys):
    """A study moved to a new machine: figures.py --evidence --records-only copies its finished
    trials (records, ground-truth summaries, final weights), --import-finished takes them into
    the new study folder as finished, whose tables are then the same as the first study's; a
    copy of another run, or one that did not finish, is never taken."""
    import shutil

    import figures
    from run import main as run_main
    from runfolder import RunFolder
    data = no_data(tmp_path)

    def argv(out, *extra):
        return ["--out", str(out), "--metric", "Test_gt", "VAE", "--seed", "1", "--alpha", "5",
                "--omega", "0.9", *extra, "--", *TINY, "--gt-interval", "3", "--data-dir",
                str(data)]

    first = tmp_path / "first"
    spec = study.make_spec(*study.parse_args(argv(first)))
    for trial in study.expand(spec):  # trained here, in this process: nothing to launch
        assert run_main(study.trial_argv(spec, trial, first)) == 0
    assert study.main(argv(first)) == 0
    names = [t["name"] for t in json.loads((first / "study.json").read_text())["trials"]]
    misc = tmp_path / "misc"
    assert [s for s, _ in RunFolder(first / names[0]).gt_summaries()] == [3, 6]
    assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc)]) == 0
    assert sorted(p.name for p in misc.iterdir()) == ["runs"]  # no tables, no figures
    for name in names:  # the summary at the end (and at --at, 50,000 by default) alone
        kept = RunFolder(misc / "runs" / name)
        assert [s for s, _ in kept.gt_summaries()] == [6] and kept.holds_finished_export()
    assert figures.main(["--evidence", str(first), "--records-only", "--at", "3", "--out",
                         str(misc), "--force"]) == 0
    assert [s for s, _ in RunFolder(misc / "runs" / names[0]).gt_summaries()] == [3, 6]
    capsys.readouterr()

    second = tmp_path / "second"
    assert study.main(argv(second, "--import-finished", str(misc / "runs"))) == 0
    err = capsys.readouterr().err
    assert f"took 2 finished trial(s) from {misc / 'runs'}" in err
    trials = json.loads((second / "study.json").read_text())["trials"]
    assert [(t["name"], t["state"], t["attempts"]) for t in trials] == [
        (name, "finished", 0) for name in names]
    for name in names:
        folder = RunFolder(second / name)
        assert not folder.checkpoint_path.exists() and folder.is_complete()
        assert json.loads((folder.path / folder.IMPORTED).read_text())["imported_from"] == str(
            (misc / "runs" / name).resolve())
    tables = {}
    for out in (first, second):
        assert figures.main(["--evidence", str(out), "--at", "6", "--out", str(out / "ev")]) == 0
        tables[out] = [json.loads((out / "ev" / f).read_text()) for f in ("claims.json",
                                                                          "scores.json")]
    assert tables[first] == tables[second]
    before = digest(second)
    assert study.main(argv(second, "--import-finished", str(misc / "runs"))) == 0
    assert {k: v for k, v in digest(second).items() if not k.startswith(("summary", "ev/"))} == {
        k: v for k, v in before.items() if not k.startswith(("summary", "ev/"))}

    vae, nonsyn = misc / "runs" / names[1], misc / "runs" / names[0]
    swapped = tmp_path / "swapped"  # the VAE's copy under the Non-Syn trial's name
    shutil.copytree(misc / "runs", swapped)
    shutil.rmtree(swapped / names[0])
    shutil.copytree(vae, swapped / names[0])
    capsys.readouterr()
    assert study.main(argv(tmp_path / "third", "--import-finished", str(swapped))) == 2
    err = capsys.readouterr().err
    assert f"{swapped / names[0]} holds another run than trial {names[0]} (metric 'VAE'" in err
    assert "nothing was imported" in err and not (tmp_path / "third" / names[1]).exists()

    longer = tmp_path / "longer"  # the trial's run at another length: trains here
    shutil.copytree(misc / "runs", longer)
    record = json.loads((longer / names[0] / "config.json").read_text())
    record["config"]["steps"] = 12
    (longer / names[0] / "config.json").write_text(json.dumps(record))
    trials = study.expand(spec)
    configs = study.check_trials(spec, trials, tmp_path / "fifth")
    assert [name for name, _ in study.importable(tmp_path / "fifth", trials, configs,
                                                 longer)] == [names[1]]
    assert f"{longer / names[0]} is this trial's run trained for 12 steps, not 6" in \
        capsys.readouterr().err

    cut = RunFolder(tmp_path / "cut")  # the final evaluation's record lost: not finished
    shutil.copytree(nonsyn, cut.path)
    lines = (cut.path / cut.LOG).read_text().splitlines(keepends=True)
    (cut.path / cut.LOG).write_text("".join(
        line for line in lines if not (json.loads(line)["kind"] == "eval"
                                       and json.loads(line)["step"] == 6)))
    assert RunFolder(nonsyn).is_complete() and not cut.is_complete()
    assert study.main(argv(tmp_path / "fourth", "--import-finished",
                           str(tmp_path / "nowhere"))) == 2
    assert "--import-finished " + str(tmp_path / "nowhere") + ": no such folder" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_a_stopped_trial_banked_and_resumed_on_another_machine_ends_as_if_never_stopped(
        tmp_path, capsys, monkeypatch, at_step):
    """A session that ends mid-trial on a machine it will not get back: figures.py --evidence
    --carry banks the stopped trial whole (records, images, its checkpoints, no machine paths),
    study.py --import-unfinished takes it into a study on a new machine, which resumes it from
    that step to the very weights and records of a run never stopped; once it finished, the
    next banking drops its copy. An older checkpoint never replaces a later copy, a trial that
    trains now is not banked, and a damaged copy is not resumed."""
    import shutil

    import figures
    from run import main as run_main
    from runfolder import RunFolder
    data = no_data(tmp_path)
    nine = [v if v != "6" else "9" for v in TINY[:TINY.index("--gt-interval")]]

    def argv(out, *extra):
        return ["--out", str(out), "--metric", "Test_gt", "VAE", "--seed", "1", "--alpha", "5",
                "--omega", "0.9", *extra, "--", *nine, "--gt-interval", "3", "--eval-metrics",
                "mig", "--keep-interval", "3", "--data-dir", str(data)]

    def stop_after(n, folder_argv):
        at_step(n, lambda solver: os.kill(os.getpid(), signal.SIGTERM))
        assert run_main(folder_argv) == 130
        monkeypatch.undo()

    torch.set_num_threads(1)  # as the study's trials below (--threads 1): the same arithmetic
    straight, first, second = (tmp_path / n for n in ("straight", "first", "second"))
    spec = study.make_spec(*study.parse_args(argv(first)))
    nonsyn, vae = study.expand(spec)
    for trial in (nonsyn, vae):
        assert run_main(study.trial_argv(spec, trial, straight)) == 0
    stop_after(5, study.trial_argv(spec, nonsyn, first))  # the session ends at step 5
    assert run_main(study.trial_argv(spec, vae, first)) == 0
    study.Study(first).adopt(spec)  # study.json as the stopped study leaves it
    misc, carry = tmp_path / "misc", tmp_path / "carry"
    capsys.readouterr()
    assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc),
                         "--carry", str(carry)]) == 0
    out = capsys.readouterr().out
    assert f"1 unfinished trial(s) banked to resume elsewhere ({nonsyn['name']} at step 5)" in out
    assert sorted(p.name for p in carry.iterdir()) == [nonsyn["name"]]
    assert sorted(p.name for p in (misc / "runs").iterdir()) == [vae["name"]]
    banked = RunFolder(carry / nonsyn["name"])
    assert banked.kept_steps() == [3] and banked.load_checkpoint()["step"] == 5
    assert [s for s, _ in banked.gt_summaries()] == [3] and len(banked.traversals()) >= 1
    for path in [*banked.path.rglob("*"), *(misc / "runs").rglob("*")]:  # model.pt too
        assert not path.is_file() or str(tmp_path).encode() not in path.read_bytes(), path
    assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc),
                         "--force", "--carry", str(carry)]) == 0  # nothing new to bank
    assert "0 unfinished trial(s) banked" in capsys.readouterr().out

    with RunFolder(first / nonsyn["name"]).writer_lock():  # the study still trains it
        assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc),
                             "--force", "--carry", str(tmp_path / "elsewhere")]) == 2
    assert f"trial {nonsyn['name']} is training now" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()

    monkeypatch.chdir(tmp_path)  # the copy resumes on the data it finds here: procedural
    assert study.main(argv(second, "--import-finished", str(misc / "runs"),
                           "--import-unfinished", str(carry), "--workers", "1",
                           "--threads", "1")) == 0
    err = capsys.readouterr().err
    assert f"took 1 finished trial(s) from {misc / 'runs'}: {vae['name']}" in err
    assert (f"took 1 stopped trial(s) from {carry} to resume: {nonsyn['name']} (stopped at "
            f"step 5 on another machine)") in err
    resumed, never = RunFolder(second / nonsyn["name"]), RunFolder(straight / nonsyn["name"])
    ends = [folder.load_checkpoint() for folder in (resumed, never)]
    assert ends[0]["step"] == 9 and all(torch.equal(ends[0]["model"][k], ends[1]["model"][k])
                                        for k in ends[1]["model"])
    strip = lambda folder: [{k: v for k, v in r.items() if not k.endswith("seconds")}
                            for r in folder.records()]  # all but the timings
    assert strip(resumed) == strip(never)
    assert resumed.kept_steps() == never.kept_steps() == [3, 6, 9]
    assert [r["step"] for r in resumed.read_config()["resumes"]] == [5]

    assert figures.main(["--evidence", str(second), "--records-only", "--out", str(misc),
                         "--force", "--carry", str(carry)]) == 0
    assert "removed the copies of 1 trial(s) finished since" in capsys.readouterr().out
    assert not carry.exists() or not any(carry.iterdir())
    assert RunFolder(misc / "runs" / nonsyn["name"]).holds_finished_export()

    # an older checkpoint than the banked copy is refused; the copy stays as it was
    older = tmp_path / "older"
    shutil.copytree(first / nonsyn["name"], older)
    stop_after(2, ["--resume", str(first / nonsyn["name"])])  # on to step 7, banked
    assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc),
                         "--force", "--carry", str(carry)]) == 0
    assert RunFolder(carry / nonsyn["name"]).load_checkpoint()["step"] == 7
    shutil.rmtree(first / nonsyn["name"])
    shutil.copytree(older, first / nonsyn["name"])
    before = digest(carry)
    assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc),
                         "--force", "--carry", str(carry)]) == 2
    assert "at step 7, later than the study's 5" in capsys.readouterr().err
    assert digest(carry) == before
    swapped = tmp_path / "swapped"  # the Non-Syn copy under the VAE trial's name
    shutil.copytree(carry / nonsyn["name"], swapped / vae["name"])
    assert figures.main(["--evidence", str(first), "--records-only", "--out", str(misc),
                         "--force", "--carry", str(swapped)]) == 2
    assert f"{swapped / vae['name']} holds another run than the study's trial" in \
        capsys.readouterr().err

    # a damaged copy: named, and the trial trains from the start instead
    last = RunFolder(carry / nonsyn["name"]).checkpoint_path
    last.write_bytes(last.read_bytes()[:-100])
    trials = study.expand(spec)
    configs = study.check_trials(spec, trials, tmp_path / "third")
    assert study.resumable_imports(tmp_path / "third", trials, configs, carry, set()) == []
    assert f"{carry / nonsyn['name']} cannot be resumed" in capsys.readouterr().err
    with pytest.raises(study.StudyError, match="no such folder"):
        study.resumable_imports(tmp_path / "third", trials, configs, tmp_path / "nowhere", set())
