"""The real command line, in process, on the reduced grid: every experiment, determinism,
resume after an interruption, and bad input."""
import json
import os
import re
import signal

import numpy as np
import pytest
import torch

import dataset
from conftest import QUICK, no_data, records, run_cli
from config import Config, file_stem
from runfolder import RunFolder
from run import main



def final_weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    return ckpt["model"]


@pytest.mark.parametrize("metric", ["Test_gt", "test", "VAE", "BVAE", "BVAE_gt", "Factor",
                                    "BTCVAE", "DIPVAE1", "DIPVAE2", "AnnealedVAE"])
def test_every_experiment_writes_a_complete_run_folder(tmp_path, metric):
    with pytest.warns(UserWarning, match="visdom is not reachable") if metric == "test" else _no_warning():
        code, run_dir = run_cli(tmp_path, metric, "--metric", metric, "--alpha", "5.0",
                                "--omega", "0.9", "--viz_port", "9", "--c_steps", "4")
    assert code == 0
    rows = records(run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert {"recon", "kl", "syn", "best", "worst", "best_freq", "seconds"} <= set(r)
        assert sorted(r["best"] + r["worst"]) == list(range(10))
        assert all(np.isfinite(r[k]) for k in ("recon", "kl", "syn"))
    if metric == "Factor":
        assert {"tc", "d_loss"} <= set(rows[0])
    settings = json.loads((run_dir / "config.json").read_text())["config"]
    regulariser = {  # total = recon + the objective's regulariser, from its logged terms
        "BTCVAE": lambda r: r["kl"] + (settings["beta"] - 1) * r["tc"],
        "DIPVAE1": lambda r: r["kl"] + r["dip"], "DIPVAE2": lambda r: r["kl"] + r["dip"],
        "AnnealedVAE": lambda r: settings["c_gamma"] * abs(r["kl"] - r["capacity"]),
    }.get(metric)
    if regulariser is not None:
        for r in rows:
            assert r["total"] == pytest.approx(r["recon"] + regulariser(r), rel=1e-5), r
    if metric == "AnnealedVAE":  # C = c_max * min(1, t / c_steps) after t = step - 1 steps
        assert [r["capacity"] for r in rows] == pytest.approx([25 * 1 / 4, 25 * 3 / 4, 25])
    stem = "alpha_5.0" if metric in ("Test_gt", "test") else file_stem(Config(**settings))
    assert stem.startswith(("alpha_5.0", metric)) and "alpha" not in stem[len(metric):]
    for step in (3, 6):
        assert (run_dir / f"{stem}_traversal_{step}.png").is_file()
    assert (run_dir / f"{stem}_gt_6.png").is_file()
    summary = np.load(run_dir / f"{stem}_gt_6.npz")
    assert summary["pos"].shape == (8, 8, 10) and summary["marginal_orientation"].shape == (10, 10)
    from PIL import Image
    width, height = Image.open(run_dir / f"{stem}_traversal_6.png").size
    assert (width, height) == (4 * 66 + 2, 12 * 66 + 2)  # nb-test columns, 2 + z_dim rows
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["metric"] == metric and "procedural" in config["data_source"]
    assert config["config"]["viz_on"] == (metric == "test")
    assert config["versions"]["torch"] == torch.__version__
    ckpt = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["metric"] == metric


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_steps_accepts_scientific_notation_and_trains_exactly(tmp_path):
    code, run_dir = run_cli(tmp_path, "sci", "--steps", "1.1e1", "--log-interval", "5")
    assert code == 0
    assert [r["step"] for r in records(run_dir)] == [5, 10, 11]


@pytest.mark.slow  # three runs
def test_same_seed_same_metrics(tmp_path):
    _, a = run_cli(tmp_path, "a", "--seed", "3")
    _, b = run_cli(tmp_path, "b", "--seed", "3")
    _, c = run_cli(tmp_path, "c", "--seed", "4")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(records(a)) == strip(records(b))
    assert strip(records(a)) != strip(records(c))


@pytest.mark.slow
@pytest.mark.parametrize("metric, update, sample", [
    ("Test_gt", "original", "no_sample"), ("Test_gt", "original", "sample"),
    ("Test_gt", "two-step", "no_sample"), ("Test_gt", "joint", "sample"),
    ("Factor", "original", "no_sample"), ("BTCVAE", "original", "no_sample"),
    ("DIPVAE2", "original", "no_sample"), ("AnnealedVAE", "original", "no_sample")])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, at_step,
                                                                metric, update, sample):
    flags = ["--metric", metric, "--update", update, "--sample", sample, "--steps", "9",
             "--save-interval", "4", "--seed", "5"]
    assert run_cli(tmp_path, "straight", *flags)[0] == 0

    # SIGTERM between steps 6 and 7, off the save interval
    at_step(6, lambda solver: os.kill(os.getpid(), signal.SIGTERM))
    code, run_dir = run_cli(tmp_path, "resumed", *flags)
    assert code == 130
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["step"] == 6
    monkeypatch.undo()
    assert main(["--resume", str(run_dir)]) == 0

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(run_dir)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(records(run_dir)) == strip(records(tmp_path / "straight"))


def test_resume_can_extend_but_not_change_the_run(tmp_path, capsys):
    _, run_dir = run_cli(tmp_path, "r")
    assert main(["--resume", str(run_dir)]) == 2
    assert "already at step 6" in capsys.readouterr().err
    assert main(["--resume", str(run_dir), "--steps", "8", "--alpha", "2"]) == 2
    assert "cannot change --alpha" in capsys.readouterr().err
    assert main(["--resume", str(run_dir), "--steps", "8", "--z-dim", "4"]) == 2
    err = capsys.readouterr().err  # flags as a user types them: --no-cuda, not --cuda
    assert "cannot change --z_dim" in err and "--no-cuda" in err and "--cuda," not in err
    assert "--log-interval" in err and "--log_interval" not in err
    assert main(["--resume", str(run_dir), "--steps", "8"]) == 0
    assert records(run_dir)[-1]["step"] == 8
    metadata = json.loads((run_dir / "config.json").read_text())
    assert metadata["config"]["steps"] == 6  # what the run was started with, kept
    assert [(r["step"], r["changed"]) for r in metadata["resumes"]] == [(6, {"steps": 8})]


@pytest.mark.parametrize("flag, value, message", [
    ("--omega", "0", "--omega: must be > 0"),
    ("--omega", "1.5", "--omega: must be <= 1"),
    ("--alpha", "-1", "--alpha: must be >= 0"),
    ("--z_dim", "0", "--z_dim: must be >= 1"),
    ("--steps", "0", "--steps: must be >= 1"),
    ("--steps", "2.5", "--steps: '2.5' is not a whole number"),
    ("--batch_size", "1", "--batch_size: must be >= 2"),
    ("--nb-test", "0", "--nb-test: must be >= 1"),
    ("--log-interval", "0", "--log-interval: must be >= 1"),
    ("--gt-interval", "x", "--gt-interval: 'x' is not a number"),
    ("--viz_on", "maybe", "--viz_on: expected True or False"),
    ("--eval-metrics", "mig,foo", "--eval-metrics: unknown metric(s) foo"),
    ("--metric", "beta", "--metric: invalid choice: 'beta'"),
])
def test_bad_flag_values_name_the_flag(capsys, flag, value, message):
    with pytest.raises(SystemExit) as info:
        main([flag, value])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_viz_on_parses_booleans():
    from config import build_parser
    assert build_parser().parse_args(["--viz_on", "True"]).viz_on is True
    assert build_parser().parse_args(["--viz_on", "False"]).viz_on is False


@pytest.mark.slow  # three runs
def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    assert run_cli(tmp_path, "same")[0] == 0
    before = (tmp_path / "same" / "metrics.jsonl").read_bytes()
    assert run_cli(tmp_path, "same")[0] == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "same" / "metrics.jsonl").read_bytes() == before
    # generated names never collide either
    code = main([*QUICK, "--steps", "1", "--output_dir", str(tmp_path / "auto")])
    code2 = main([*QUICK, "--steps", "1", "--output_dir", str(tmp_path / "auto")])
    assert code == code2 == 0 and len(list((tmp_path / "auto").iterdir())) == 2


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([*QUICK, "--output_dir", str(blocker / "runs")]) == 2
    assert "cannot create --output_dir" in capsys.readouterr().err


def test_corrupt_npz_stops_the_run_with_advice(tmp_path, capsys):
    (tmp_path / dataset.DSPRITES_FILE).write_bytes(b"<html>Google Drive quota exceeded</html>")
    assert main([*QUICK, "--output_dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is an HTML page, not the dSprites npz" in err and "--download" in err


@pytest.mark.parametrize("command, viz", [
    ('--alpha=5.0 --omega=0.9 --metric="Test_gt" --steps=150000 --gt-interval=5000', False),
    ('--alpha=5.0 --omega=0.9 --metric="test" --steps=150000', True),
])
def test_the_originals_readme_commands_parse_verbatim(command, viz):
    import shlex
    from config import build_parser, make_config
    config = make_config(build_parser().parse_args(shlex.split(command)))
    assert (config.alpha, config.omega, config.steps, config.viz_on) == (5.0, 0.9, 150000, viz)
    assert config.gt_interval == (5000 if not viz else 10000)


@pytest.mark.slow  # the metrics run in a child process during training
def test_metrics_during_training_and_evaluate_command(tmp_path):
    import evaluate
    code, run_dir = run_cli(tmp_path, "scored", "--gt-interval", "3", "--eval-metrics",
                            "factor_vae,mig")
    assert code == 0
    evaluations = records(run_dir, "eval")
    assert [r["step"] for r in evaluations] == [3, 6]
    assert set(evaluations[0]["scores"]) == {"factor_vae", "mig"}
    assert all(0 <= v <= 1 for r in evaluations for v in r["scores"].values())
    report = json.loads((run_dir / "metrics.json").read_text())
    (final,) = report["evaluations"]
    assert final["step"] == 6 and final["source"] == "end of training"
    assert final["scores"]["factor_vae"]["protocol"]["num_train"] == 10000
    assert final["versions"]["scikit-learn"] and final["eval_seed"] == 0
    assert final["scores"]["mig"]["score"] == evaluations[1]["scores"]["mig"]

    assert evaluate.main([str(run_dir), "--eval-metrics", "factor_vae,mig,sap", "--no-cuda"]) == 0
    report = json.loads((run_dir / "metrics.json").read_text())
    assert len(report["evaluations"]) == 2  # appended, the training one kept
    again = report["evaluations"][1]
    assert again["source"] == "evaluate.py" and set(again["scores"]) == {"factor_vae", "mig", "sap"}
    for name in ("factor_vae", "mig"):  # same weights, same seed: the same numbers
        assert again["scores"][name]["score"] == final["scores"][name]["score"]


@pytest.mark.slow  # a run and three evaluations of it
def test_evaluate_reads_a_folder_of_final_weights_and_writes_only_where_told(tmp_path, capsys):
    """evaluate.py on misc/runs/<run> appended to its tracked metrics.json and added a
    ground-truth plot into the repository: a folder of final weights is read-only now."""
    import hashlib
    import shutil

    import evaluate
    from runfolder import RunFolder, export_weights
    code, run_dir = run_cli(tmp_path, "Factor", "--metric", "Factor", "--steps", "2",
                            "--eval-metrics", "mig")
    assert code == 0
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(run_dir / "config.json", shipped)
    export_weights(RunFolder(run_dir), shipped)
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                      for p in shipped.iterdir()}
    before = digest()
    capsys.readouterr()
    assert evaluate.main([str(shipped), "--no-cuda"]) == 0
    assert digest() == before
    out = capsys.readouterr().out
    assert "mig " in out and "not written" in out and "--json FILE or --out DIR" in out
    assert evaluate.main([str(shipped), "--no-cuda", "--json", str(tmp_path / "s.json"),
                          "--out", str(tmp_path / "e")]) == 0
    assert digest() == before
    assert json.loads((tmp_path / "s.json").read_text())["mig"] == json.loads(
        (run_dir / "metrics.json").read_text())["evaluations"][-1]["scores"]["mig"]["score"]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "Factor_gamma6.4_gt_2.npz", "Factor_gamma6.4_gt_2.png", "metrics.json"]  # no alpha
    assert evaluate.main([str(shipped), "--no-cuda", "--json", str(tmp_path / "s.json")]) == 2
    assert "exists and is never overwritten" in capsys.readouterr().err
    assert evaluate.main([str(shipped), "--no-cuda", "--out", str(run_dir)]) == 2
    assert "is a run folder" in capsys.readouterr().err
    assert evaluate.main([str(shipped), "--no-cuda", "--out", str(shipped)]) == 2
    assert digest() == before


@pytest.mark.slow  # a run, its import into a study and an evaluation
def test_evaluate_writes_into_a_study_trial_imported_from_final_weights(tmp_path, capsys):
    """A trial study.py --import-finished took from misc/runs holds the final weights alone;
    evaluate.py refused to write into it, so the DCI the docs ask for at the end of the
    evidence study was printed and never recorded. The study's copy (imported.json beside it)
    is written into; the folder it came from is left as it was."""
    import hashlib

    import evaluate
    import study
    from runfolder import RunFolder, export_weights
    code, run_dir = run_cli(tmp_path, "Factor", "--metric", "Factor", "--steps", "2",
                            "--eval-metrics", "mig")
    assert code == 0
    shipped = tmp_path / "shipped" / "Factor"
    shipped.mkdir(parents=True)
    for name in RunFolder.RECORDS:
        (shipped / name).write_bytes((run_dir / name).read_bytes())
    export_weights(RunFolder(run_dir), shipped)
    digest = lambda folder: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                             for p in folder.iterdir()}
    before = digest(shipped)
    (tmp_path / "study").mkdir()
    assert study.take_imports(tmp_path / "study", [("Factor", RunFolder(shipped))]) == ["Factor"]
    trial = RunFolder(tmp_path / "study" / "Factor")
    assert not trial.checkpoint_path.exists() and (trial.path / trial.IMPORTED).is_file()
    kept = trial.evaluations()
    capsys.readouterr()
    assert evaluate.main([str(trial.path), "--no-cuda", "--eval-metrics", "mig,sap"]) == 0
    assert f"-> {trial.path / trial.REPORT}" in capsys.readouterr().out
    (added,) = trial.evaluations()[len(kept):]
    assert added["source"] == "evaluate.py" and set(added["scores"]) == {"mig", "sap"}
    assert added["scores"]["mig"]["score"] == kept[-1]["scores"]["mig"]["score"]
    assert (trial.path / "Factor_gamma6.4_gt_2.png").is_file()
    assert digest(shipped) == before  # the origin stays read-only
    assert evaluate.main([str(shipped), "--no-cuda"]) == 0
    assert digest(shipped) == before and "not written" in capsys.readouterr().out


@pytest.mark.slow  # trains in emulated bf16 where the CPU has none: 25 s
def test_a_bf16_run_on_a_cpu_without_bf16_is_scored_and_drawn_in_fp32_when_asked(
        tmp_path, capsys, monkeypatch):
    """misc/runs are bf16 runs: on a CPU without native bf16, evaluate.py refused them with
    advice for run.py, and emulated bf16 would take hours. One line names --precision fp32; with
    it the scores are printed and the run folder is left as it was."""
    import hashlib

    import evaluate
    import figures
    import precision
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    code, run_dir = run_cli(tmp_path, "b", "--precision", "bf16", "--steps", "2",
                            "--eval-metrics", "mig")
    assert code == 0
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())  # no native bf16 now
    digest = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                      for p in sorted(run_dir.rglob("*")) if p.is_file()}
    before = digest()
    capsys.readouterr()
    assert evaluate.main([str(run_dir), "--no-cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run was trained in bf16" in err
    assert "Add --precision fp32 to evaluate.py" in err
    assert evaluate.main([str(run_dir), "--no-cuda", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "mig " in out and "not written: scored in fp32, not the run's own bf16" in out
    assert digest() == before
    monkeypatch.setattr(figures, "_TRAINED", {})
    with pytest.raises(figures.FigureError, match="Add --precision fp32 to figures.py"):
        figures._from_weights(RunFolder(run_dir))
    monkeypatch.setattr(figures, "DRAW_PRECISION", ["fp32"])
    assert figures._from_weights(RunFolder(run_dir)).config.precision == "fp32"


def test_a_figures_command_that_fails_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    """The refused figures.py left an empty figures/<date-time> behind."""
    import figures
    code, run_dir = run_cli(tmp_path, "r", "--steps", "2")
    assert code == 0

    def refuse(args, out):
        raise figures.FigureError("the run cannot be drawn")
    monkeypatch.setattr(figures, "_thesis", refuse)
    monkeypatch.chdir(tmp_path)
    roles = ["--nonsyn", str(run_dir), "--factor", str(run_dir), "--vae", str(run_dir)]
    assert figures.main(roles) == 2
    assert "the run cannot be drawn" in capsys.readouterr().err
    assert not list((tmp_path / "figures").glob("*"))  # the default figures/<date-time>
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert figures.main(roles + ["--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"  # a folder it did not make


def test_evaluate_scores_the_runs_own_metrics_and_the_sample_measures(tmp_path, capsys):
    import evaluate
    code, run_dir = run_cli(tmp_path, "own", "--eval-metrics", "mig")
    capsys.readouterr()
    assert evaluate.main([str(run_dir), "--no-cuda"]) == 0
    last = json.loads((run_dir / "metrics.json").read_text())["evaluations"][-1]
    assert last["source"] == "evaluate.py" and set(last["scores"]) == {"mig"}
    assert last["measures"]["n_images"] == 200  # the run's own --eval-sample
    out = capsys.readouterr().out
    assert "mig " in out and "i_max " in out


@pytest.mark.slow
def test_evaluate_on_a_run_still_training_warns_and_writes_nothing(tmp_path, capsys, caplog):
    import hashlib
    import subprocess
    import sys
    import evaluate
    code, run_dir = run_cli(tmp_path, "busy", "--eval-metrics", "mig")
    digest = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                      for p in sorted(run_dir.rglob("*")) if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(run_dir / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write('4242\\n'); f.flush(); print('held', flush=True)\n"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = digest()
        with caplog.at_level("WARNING"):
            assert evaluate.main([str(run_dir), "--no-cuda"]) == 0
        assert digest() == before  # nothing written into the folder of a run in training
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        assert "still training (PID 4242)" in warning and "step 6 of 6" in warning
        assert "not written" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


def test_evaluate_needs_a_checkpoint(tmp_path, capsys):
    import evaluate
    assert evaluate.main([str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("setting, value, message", [
    ("omega", 0.0, "omega must be > 0"),
    ("omega", 1.5, "omega must be <= 1"),
    ("alpha", -1, "alpha must be >= 0"),
    ("z_dim", 2.5, "z_dim must be a whole number"),
    ("batch_size", 1, "batch_size must be >= 2"),
    ("steps", "10", "steps must be a whole number"),
    ("viz_port", 70000, "viz_port must be <= 65535"),
    ("metric", "beta", "metric must be one of Test_gt"),
    ("grid", "tiny", "grid must be one of full, reduced"),
    ("viz_on", "False", "viz_on must be True or False"),
    ("eval_metrics", "mig,foo", "eval_metrics must name metrics from"),
    ("run_name", 3, "run_name must be text"),
])
def test_config_built_in_code_is_checked_like_the_flags(setting, value, message):
    from config import Config
    from utils import ConfigError
    with pytest.raises(ConfigError, match=message):
        Config(**{setting: value})


def test_config_takes_ints_for_floats_and_whole_floats_for_ints():
    from config import Config
    config = Config(alpha=5, steps=1e3)
    assert config.alpha == 5.0 and isinstance(config.alpha, float)
    assert config.steps == 1000 and isinstance(config.steps, int)


def test_a_checkpoint_with_a_bad_stored_setting_is_refused(tmp_path, capsys):
    _, run_dir = run_cli(tmp_path, "stored")
    path = run_dir / "checkpoints/last.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["omega"] = 7.0
    torch.save(checkpoint, path)
    assert main(["--resume", str(run_dir), "--steps", "8"]) == 2
    assert "omega must be <= 1" in capsys.readouterr().err


def test_unknown_checkpoint_format_is_refused_with_a_clear_error(tmp_path, capsys):
    import evaluate
    _, run_dir = run_cli(tmp_path, "old")
    path = run_dir / "checkpoints/last.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["format"] = 99
    torch.save(checkpoint, path)
    before = path.read_bytes()
    assert main(["--resume", str(run_dir), "--steps", "8"]) == 2
    assert "checkpoint format 99" in capsys.readouterr().err
    assert evaluate.main([str(run_dir)]) == 2
    assert "reads formats 1 to 7" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_every_multi_word_flag_takes_both_spellings():
    from config import build_parser
    parser = build_parser()
    original = parser.parse_args(["--batch_size", "8", "--data-dir", "d", "--output_dir", "o",
                                  "--run-name", "r", "--nb-test", "3", "--viz_il_iter", "7",
                                  "--lr_VAE", "0.001", "--no-cuda", "--eval-metrics", "mig"])
    other = parser.parse_args(["--batch-size", "8", "--data_dir", "d", "--output-dir", "o",
                               "--run_name", "r", "--nb_test", "3", "--viz-il-iter", "7",
                               "--lr-VAE", "0.001", "--no_cuda", "--eval_metrics", "mig"])
    assert vars(original) == vars(other)
    multi_word = [s for a in parser._actions for s in a.option_strings
                  if s.startswith("--") and ("_" in s[2:] or "-" in s[2:])]
    for flag in multi_word:  # every multi-word flag has its twin
        twin = "--" + (flag[2:].replace("_", "-") if "_" in flag[2:] else flag[2:].replace("-", "_"))
        assert twin in multi_word, flag
    help_text = parser.format_help()
    options = help_text.split("\noptions:")[1]
    assert "--batch_size" in options and "--batch-size" not in options  # original shown
    for title in ("objective", "optimiser", "data", "run folder", "monitoring"):
        assert f"\n{title}:" in help_text


def test_metric_test_with_viz_on_false_is_an_error_naming_both(tmp_path, capsys):
    assert main([*QUICK, "--output_dir", str(tmp_path), "--metric", "test",
                 "--viz_on", "False"]) == 2
    err = capsys.readouterr().err
    assert "--metric test" in err and "--viz_on False" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder made


def test_dry_run_checks_and_prints_the_settings_writing_nothing(tmp_path, capsys):
    assert main(["--dry-run", "--metric", "VAE", "--steps", "1.5e5", "--output_dir",
                 str(tmp_path / "o")]) == 0
    verdict, settings = capsys.readouterr().out.strip().splitlines()
    assert verdict == "ok: the settings are valid"
    assert json.loads(settings)["steps"] == 150000 and json.loads(settings)["metric"] == "VAE"
    with pytest.raises(SystemExit) as refused:
        main(["--dry-run", "--omega", "2"])
    assert refused.value.code == 2 and "--omega" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- first contact: common mistakes get one line, and leave nothing behind ----------------------

def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flags, message", [
    (["--data-dir", "{tmp}/nowhere"], "nowhere does not exist"),
    (["--data-dir", "{tmp}/a-file"], "a-file is a file, not a folder"),
    (["--dataset", "celeba", "--data-dir", "{tmp}"], "no CelebA in"),
])
def test_dry_run_checks_the_data_as_the_run_does(tmp_path, capsys, flags, message):
    """--dry-run (and study.py's trial check, the same code) accepted data the run refused: a
    study then launched every trial three times and stored the bad flags."""
    import study
    (tmp_path / "a-file").write_text("x")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["--dry-run", *flags]) == 2
    assert message in one_error_line(capsys)
    assert study.main(["--out", str(tmp_path / "s"), "--metric", "VAE", "--", *flags]) == 2
    assert "would be refused by run.py" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_data_dir_that_does_not_exist_is_named_and_no_folder_is_made(tmp_path, capsys):
    missing = tmp_path / "datsets"
    assert main([*QUICK, "--output_dir", str(tmp_path / "runs"), "--data-dir", str(missing)]) == 2
    line = one_error_line(capsys)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    (tmp_path / "a-file").write_text("x")
    assert main([*QUICK, "--output_dir", str(tmp_path / "runs"), "--data-dir",
                 str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)


def test_an_existing_data_dir_without_the_npz_trains_on_the_procedural_dsprites(tmp_path,
                                                                                caplog):
    with caplog.at_level("INFO"):
        code, run_dir = run_cli(tmp_path, "procedural")
    assert code == 0
    assert any("procedural renderer" in r.getMessage() and "--download" in r.getMessage()
               for r in caplog.records)


def test_resume_of_a_path_that_does_not_exist_is_one_line(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "outputs" / "nope")]) == 2
    line = one_error_line(capsys)
    assert "nope does not exist" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # two runs
def test_resume_of_a_folder_of_runs_names_them_and_leaves_no_lock(tmp_path, capsys):
    assert run_cli(tmp_path / "outputs", "first")[0] == 0
    assert run_cli(tmp_path / "outputs", "second")[0] == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert main(["--resume", str(tmp_path / "outputs"), "--steps", "8"]) == 2
    line = one_error_line(capsys)
    assert "is not a run folder" in line and "first, second" in line
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == before  # no .lock
    (tmp_path / "empty").mkdir()
    assert main(["--resume", str(tmp_path / "empty")]) == 2
    assert "holds no run folders" in one_error_line(capsys)
    assert not any((tmp_path / "empty").iterdir())
    assert main(["--dry-run", "--resume", str(tmp_path / "empty")]) == 2
    assert not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("argv, hint", [
    (["--metric", "test_gt"], "did you mean 'Test_gt'?"),
    (["--metric", "factor"], "did you mean 'Factor'?"),
    (["--update", "twostep"], "did you mean 'two-step'?"),
    (["--eval-metrics", "factorvae"], "did you mean 'factor_vae'?"),
])
def test_an_invalid_choice_suggests_the_closest_valid_value(capsys, argv, hint):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert hint in capsys.readouterr().err


@pytest.mark.slow  # two runs and a resume
def test_config_json_records_the_device_asked_for_and_used(tmp_path):
    code, run_dir = run_cli(tmp_path, "cpu")
    device = json.loads((run_dir / "config.json").read_text())["device"]
    assert device["requested"] == "cpu" and device["used"] == "cpu"  # --no-cuda in QUICK
    assert device["torch_threads"] == torch.get_num_threads() and device["precision"] == "fp32"
    assert device["cpu"] and device["model"] == device["cpu"]
    flags = [f for f in QUICK if f != "--no-cuda"]
    assert main([*flags, "--output_dir", str(tmp_path), "--run-name", "asked",
                 "--data-dir", str(no_data(tmp_path))]) == 0
    device = json.loads((tmp_path / "asked" / "config.json").read_text())["device"]
    assert device["requested"] == "cuda"
    assert device["used"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert main(["--resume", str(run_dir), "--steps", "8"]) == 0
    resume = json.loads((run_dir / "config.json").read_text())["resumes"][0]
    assert resume["device"]["used"] == "cpu"


@pytest.mark.slow  # two runs and two evaluations
def test_kept_checkpoints_are_scored_by_step_and_change_nothing_else(tmp_path, capsys):
    """--keep-interval keeps checkpoints/step_N.pt beside the latest without touching the
    training; evaluate.py --step N scores one and files it under its step, while the run's own
    numbers stay those of its last step; a step not kept is one line naming the kept ones."""
    import evaluate
    from runfolder import RunFolder
    assert run_cli(tmp_path, "plain")[0] == 0
    code, run_dir = run_cli(tmp_path, "kept", "--keep-interval", "2")
    assert code == 0
    folder = RunFolder(run_dir)
    assert folder.kept_steps() == [2, 4, 6]
    plain = RunFolder(tmp_path / "plain").load_checkpoint()["model"]
    last = folder.load_checkpoint()
    assert all(torch.equal(plain[k], v) for k, v in last["model"].items())  # same training
    kept = folder.load_checkpoint(4)
    assert kept["step"] == 4 and not all(torch.equal(kept["model"][k], v)
                                         for k, v in last["model"].items())
    capsys.readouterr()
    assert evaluate.main([str(run_dir), "--step", "4", "--eval-metrics", "mig", "--no-cuda"]) == 0
    assert "step 4: mig " in capsys.readouterr().out
    steps = [e["step"] for e in folder.evaluations()]
    assert steps == [6, 4]
    assert folder.last_evaluated("measures") == folder.evaluations()[0]["measures"]
    assert folder.last_evaluated("measures", step=4) == folder.evaluations()[1]["measures"]
    assert folder.last_evaluated("scores", step=4).keys() == {"mig"}
    before = (run_dir / "metrics.json").read_bytes()
    assert evaluate.main([str(run_dir), "--step", "5", "--no-cuda"]) == 2
    assert "kept no checkpoint at step 5 (kept steps: 2, 4, 6)" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_bytes() == before
    assert evaluate.main([str(tmp_path / "plain"), "--step", "6", "--no-cuda"]) == 2
    assert "--keep-interval N" in capsys.readouterr().err


def test_the_runs_numbers_are_those_of_its_latest_step_whatever_the_order_evaluated(tmp_path):
    """evaluate.py --step may append an earlier step's evaluation after the final one: the
    summaries still take the latest step's (the last appended among equals)."""
    from runfolder import RunFolder
    folder = RunFolder(tmp_path)
    entries = [dict(step=6, measures={"i_max": 1.0}), dict(step=6, measures={"i_max": 2.0}),
               dict(step=4, measures={"i_max": 3.0}), dict(step=4, scores={"mig": 0.5})]
    (tmp_path / "metrics.json").write_text(json.dumps({"evaluations": entries}))
    assert folder.last_evaluated("measures") == {"i_max": 2.0}
    assert folder.last_evaluated("measures", step=4) == {"i_max": 3.0}
    assert folder.last_evaluated("scores") == {"mig": 0.5}  # the latest step that has scores
    assert folder.last_evaluated("scores", step=6) == {}
    entries += [dict(step=6, scores={"mig": 0.1, "dci": 0.2}), dict(step=6, scores={"dci": 0.3})]
    (tmp_path / "metrics.json").write_text(json.dumps({"evaluations": entries}))
    assert folder.last_evaluated("scores") == {"mig": 0.1, "dci": 0.3}  # merged, latest wins
    (tmp_path / "checkpoints").mkdir()
    for name in ("step_10.pt", "step_2.pt", "step_x.pt", "last.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert folder.kept_steps() == [2, 10]


@pytest.mark.parametrize("argv, expected", [
    (["--alpah=5.0"], "unrecognized arguments: --alpah=5.0; did you mean '--alpha'?"),
    (["--stpes", "10"], "unrecognized arguments: --stpes 10; did you mean '--steps'?"),
    (["--alpha", "five"], "argument --alpha: 'five' is not a number"),
])
def test_a_mistyped_flag_or_value_is_one_line_with_the_closest_flag(capsys, argv, expected):
    """One line, no 22-line usage: the closest flag for an unknown one, and --help for the rest
    (run.py, study.py, evaluate.py and figures.py share the parser)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err and "--help' lists every flag" in err and "usage:" not in err


@pytest.mark.slow  # three evaluations of the grid in one run
def test_a_run_says_its_expected_wall_clock_and_how_to_shorten_it(tmp_path, caplog, monkeypatch):
    """A bare ``python run.py`` trained 300,000 steps for many hours without a word."""
    import solver
    monkeypatch.setattr(solver.Forecast, "MEASURE_STEPS", 3)
    with caplog.at_level("INFO"):
        code, _ = run_cli(tmp_path, "forecast", "--steps", "12", "--gt-interval", "5",
                          "--eval-metrics", "mig")
    assert code == 0
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("expected:")]
    assert len(told) == 2, told
    assert re.fullmatch(r"expected: 8 steps more at [\d.e+]+ step/s ≈ \d+ s of training, plus 3 "
                        r"ground-truth evaluation\(s\) \(every 5 steps; their time is logged "
                        r"after the first\); shorten with --steps N, a larger --gt-interval or "
                        r"--eval-metrics none", told[0]), told[0]
    assert re.fullmatch(r"expected: an evaluation takes \d+ s; with 2 more, ≈ \d+ s left in all",
                        told[1]), told[1]


def test_a_redirected_log_gets_a_progress_line_every_few_percent(capfd):
    """tqdm wrote 248 KB of carriage-return redraws into the demo's redirected log."""
    from utils import LineProgress, progress
    import io
    out = io.StringIO()
    bar = progress(3000, desc="training", file=out)
    assert isinstance(bar, LineProgress)  # a StringIO is not a terminal
    with bar:
        for _ in range(3000):
            bar.update(1)
        bar.write("a log line")
    lines = out.getvalue().splitlines()
    assert len(lines) == 21 and "\r" not in out.getvalue()
    assert re.fullmatch(r"training:   5% 150/3,000 steps, [\d.e+]+ step/s, 00:00 elapsed, "
                        r"~\S+ left", lines[0]), lines[0]
    assert lines[-2].startswith("training: 100% 3,000/3,000 steps") and lines[-1] == "a log line"
    resumed = LineProgress(100, initial=40, desc="training", file=io.StringIO())
    resumed.update(3)
    assert resumed.file.getvalue() == ""  # 43 %: no 5 % mark passed since 40
    resumed.update(2)
    assert resumed.file.getvalue().startswith("training:  45% 45/100 steps")


def test_a_resume_on_other_data_than_the_run_trained_on_is_refused(tmp_path, monkeypatch, capsys):
    """A run resumed where other dSprites are found (a run carried to another machine, a file
    put in ./datasets meanwhile) would change its data mid-run: refused, nothing written; the
    same data, wherever it lies, resumes."""
    monkeypatch.setattr(dataset, "FULL_SIZES", (3, 6, 2, 4, 4))  # a 576-image stand-in grid
    code, run_dir = run_cli(tmp_path, "r", "--grid", "full", "--eval-sample", "100")
    assert code == 0  # trained on the procedural renderer
    classes = dataset.grid_classes("full")
    official = tmp_path / "official"
    official.mkdir()
    full = np.concatenate([np.zeros((len(classes), 1), np.int64), classes], axis=1)
    np.savez_compressed(official / dataset.DSPRITES_FILE, imgs=dataset.render_dsprites(classes),
                        latents_classes=full, latents_values=dataset.latents_values(classes))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["--resume", str(run_dir), "--steps", "8", "--data-dir", str(official)]) == 2
    err = capsys.readouterr().err
    assert (f"{run_dir} trained on dSprites from the procedural renderer, but the data found "
            f"here is the official dSprites file (md5 ") in err and "nothing was changed" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    other = tmp_path / "elsewhere"  # another empty folder: the same renderer
    other.mkdir()
    assert main(["--resume", str(run_dir), "--steps", "8", "--data-dir", str(other)]) == 0
    assert records(run_dir)[-1]["step"] == 8
