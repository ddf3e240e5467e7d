"""study.py's local engine on tiny trials: the grid, idempotent reruns, the summary against the
runs' own files, a killed worker retried from its checkpoint, and bad specs refused up front."""
import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import study
from conftest import ROOT, cmdline

TINY = ["--grid", "reduced", "--batch_size", "8", "--steps", "6", "--log-interval", "3",
        "--save-interval", "3", "--gt-interval", "6", "--eval-metrics", "mig", "--no-cuda",
        "--nb-test", "2"]


def grid(out, *extra, data_dir):
    return ["--out", str(out), "--metric", "Test_gt", "VAE", "--seeds", "2", "--alpha", "5",
            "--omega", "0.9", *extra, "--", *TINY, "--data-dir", str(data_dir)]


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    argv = grid(out, "--workers", "2", data_dir=out.parent / "none")
    assert study.main(argv) == 0
    return out, argv


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
        for name, source in (("recon", "train"), ("syn", "train"), ("mig", "report")):
            values = []
            for folder in folders:
                if source == "train":
                    rows_ = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                    values.append([r for r in rows_ if r["kind"] == "train"][-1][name])
                else:
                    report = json.loads((folder / "metrics.json").read_text())
                    values.append(report["evaluations"][-1]["scores"][name]["score"])
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
            assert float(row[f"{name}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{name}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-15)
    assert "| Test_gt | 5.0 | 0.9 | 2 |" in (out / "summary.md").read_text()


def test_rerunning_a_finished_study_changes_nothing_and_takes_seconds(finished):
    out, argv = finished
    before = digest(out)
    started = time.monotonic()
    assert subprocess.run([sys.executable, str(ROOT / "study.py"), *argv],
                          capture_output=True).returncode == 0
    assert time.monotonic() - started < 5
    assert digest(out) == before


def test_a_different_spec_for_the_same_folder_is_refused(finished, capsys):
    out, _ = finished
    before = digest(out)
    assert study.main(["--out", str(out), "--metric", "Factor", "--seeds", "1", "--", *TINY]) == 2
    assert "holds a study with another spec" in capsys.readouterr().err
    assert digest(out) == before


@pytest.mark.parametrize("argv, message", [
    (["--metric", "VAE", "--", "--omega", "2"], "run.py flag --omega is set by the study itself"),
    (["--metric", "Test_gt", "--omega", "2"], "would be refused by run.py"),
    (["--metric", "VAE", "--", "--batch_size", "1"], "would be refused by run.py"),
])
def test_bad_input_is_refused_before_any_trial_starts(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    try:
        code = study.main(["--out", str(out), *argv])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written, not even study.json


def test_unknown_or_empty_axes_in_a_spec_file_are_named(tmp_path, capsys):
    for spec, message in (({"metric": ["VAE"], "colour": [1]}, "unknown axis colour"),
                          ({"metric": ["VAE"], "seed": []}, "axis seed is empty")):
        path = tmp_path / "spec.json"
        path.write_text(json.dumps(spec))
        with pytest.raises(SystemExit):
            study.main(["--out", str(tmp_path / "s"), "--spec", str(path)])
        assert message in capsys.readouterr().err


def test_a_killed_worker_is_retried_and_ends_as_an_uninterrupted_trial(tmp_path):
    flags = ["--grid", "reduced", "--batch_size", "8", "--steps", "60", "--log-interval", "5",
             "--save-interval", "5", "--gt-interval", "1000", "--eval-metrics", "none",
             "--no-cuda", "--nb-test", "2", "--data-dir", str(tmp_path / "none")]
    argv = lambda out: ["--out", str(out), "--metric", "Test_gt", "--seed", "3", "--", *flags]
    assert study.main(argv(tmp_path / "straight")) == 0

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "study.py"), *argv(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = out / "Test_gt_seed3" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    victims = [int(p) for p in os.listdir("/proc") if p.isdigit() and "--run-name\0Test_gt_seed3"
               in cmdline(p) and str(out) in cmdline(p)]
    assert victims, "the trial's run.py process was not found"
    os.kill(victims[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    trial = json.loads((out / "study.json").read_text())["trials"][0]
    assert trial["state"] == "finished" and trial["attempts"] == 2
    straight = torch.load(tmp_path / "straight/Test_gt_seed3/checkpoints/last.pt",
                          weights_only=True)["model"]
    resumed = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

