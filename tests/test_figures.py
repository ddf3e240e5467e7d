"""The figure command on tiny runs made here: every file, with the expected size and frames."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import evaluate
import figures
from conftest import write_celeba_zip
from dataset import FACTOR_NAMES
from plotting import latent_factors, latent_labels
from run import main
from runfolder import RunFolder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for metric in ("Test_gt", "Factor", "VAE"):
        code = main(["--grid", "reduced", "--batch_size", "16", "--steps", "8", "--log-interval",
                     "2", "--save-interval", "2", "--gt-interval", "8", "--no-cuda", "--nb-test",
                     "5", "--alpha", "5.0", "--omega", "0.9", "--output_dir", str(root),
                     "--run-name", metric, "--data-dir", str(root), "--metric", metric,
                     "--eval-sample", "200"])
        assert code == 0
        folders[metric] = root / metric
    return folders


@pytest.fixture(scope="module")
def celeba_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    write_celeba_zip(root / "img_align_celeba.zip", 16)
    assert main(["--dataset", "celeba", "--data-dir", str(root), "--steps", "2", "--batch_size",
                 "8", "--log-interval", "1", "--save-interval", "2", "--nb-test", "5", "--no-cuda",
                 "--alpha", "5.0", "--output_dir", str(root), "--run-name", "faces"]) == 0
    return root / "faces"


@pytest.mark.slow
def test_figures_from_tiny_runs(runs, celeba_run, tmp_path):
    out = tmp_path / "misc"
    assert figures.main(["--nonsyn", str(runs["Test_gt"]), "--factor", str(runs["Factor"]),
                         "--vae", str(runs["VAE"]), "--celeba", str(celeba_run),
                         "--out", str(out)]) == 0
    gif = Image.open(out / "traversals.gif")
    assert gif.n_frames == 4  # traversals at steps 2, 4, 6, 8
    assert gif.size == (5 * 66 + 2, 12 * 66 + 2 + figures.GIF_HEADER)
    for name in ("latents.png", "VAE_traversals.png", "plots.png"):
        assert Image.open(out / name).size[0] > 500, name
    assert Image.open(out / "latents.png").size[0] > Image.open(out / "VAE_traversals.png").size[0]
    faces = Image.open(out / "faces_celeba.png")
    assert faces.mode == "RGB" and faces.size == (5 * 66 + 2, 12 * 66 + 2)
    table = json.loads((out / "comparison.json").read_text())
    assert [row["metric"] for row in table] == ["Test_gt", "Factor", "VAE", "Test_gt"]
    assert all(row["step"] == 8 and set(row["scores"]) == {"factor_vae", "mig"}
               for row in table[:3])
    assert table[3]["run"] == "CelebA" and table[3]["step"] == 2 and table[3]["scores"] == {}
    assert "| Non-Syn VAE | Non-Syn VAE (alpha 5, omega 0.9) | 8 |" in (out / "comparison.md").read_text()
    assert table[0]["measures"] == {k: json.loads((runs["Test_gt"] / "metrics.json").read_text())[
        "evaluations"][-1]["measures"][k] for k in ("recon", "kl", "elbo", "i_max")}
    for metric in ("Test_gt", "Factor", "VAE"):  # the records, without this machine's paths
        for name in RunFolder.RECORDS:
            kept, own = (out / "runs" / metric / name).read_text(), (runs[metric] / name).read_text()
            if name == "config.json":  # and the data searched for where the copy is scored
                record = json.loads(own)
                record["config"]["data_dir"] = None
                own = json.dumps(record, indent=2, sort_keys=True) + "\n"
            assert kept == figures.without_machine_paths(own)
            assert str(runs[metric].parent) not in kept
        assert str(runs[metric].parent) in (runs[metric] / "config.json").read_text()
    config = json.loads((out / "runs" / "Test_gt" / "config.json").read_text())
    assert config["config"]["output_dir"] == "<path>" and config["config"]["seed"] == 120
    exported = out / "runs" / "Test_gt"  # the weights alone score as the run itself did
    before = _digest(exported)
    assert evaluate.main([str(exported), "--no-cuda", "--eval-metrics", "mig", "--json",
                          str(tmp_path / "scores.json"), "--out", str(tmp_path / "e")]) == 0
    assert _digest(exported) == before  # read-only: the scores went to --json and --out
    final = json.loads((runs["Test_gt"] / "metrics.json").read_text())["evaluations"][-1]
    again = json.loads((tmp_path / "e" / "metrics.json").read_text())["evaluations"][-1]
    assert again["measures"] == final["measures"] and again["step"] == final["step"]
    assert again["scores"]["mig"] == final["scores"]["mig"]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["mig"] == final["scores"]["mig"]["score"] and scores["step"] == final["step"]
    assert scores["results"]["mig"]["protocol"] == final["scores"]["mig"]["protocol"]
    assert {"torch", "numpy"} <= set(scores["versions"])
    assert (tmp_path / "e" / f"alpha_5.0_gt_{final['step']}.png").is_file()
    learned = [line for line in (out / "comparison.md").read_text().splitlines()
               if line.startswith("| z")]
    assert len(learned) == 10  # a row per latent, a column per dSprites run (not CelebA)
    factors = latent_factors(figures.ground_truth_summary(RunFolder(runs["Factor"]))[1])
    assert [row.split(" | ")[2] for row in learned] == [
        "inactive" if f == "inactive" else f"{f} ({share:.2f})" for f, share in factors]
    assert all(row.count(" | ") == 3 for row in learned)
    labelled, plain = Image.open(out / "traversal_labelled.png"), Image.open(runs["Test_gt"] / "alpha_5.0_traversal_8.png")
    assert labelled.size[1] == plain.size[1] and labelled.size[0] > plain.size[0] + 40


def test_latent_labels_name_the_factor_with_most_explained_variance():
    summary = {"variance": np.array([1.0, 1.0, 1e-4])}
    for name, size in zip(FACTOR_NAMES, (3, 6, 10, 8, 8), strict=True):
        summary[f"marginal_{name}"] = np.zeros((size, 3))
    summary["marginal_posY"][:, 0] = np.linspace(-1, 1, 8)  # z0 follows position y
    summary["marginal_scale"][:, 1] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.1]  # z1: weak, under 10 %
    assert latent_labels(summary) == ["position y", "none", "inactive"]


@pytest.mark.slow
def test_missing_pieces_are_named(runs, tmp_path, capsys):
    empty = tmp_path / "empty"  # a Non-Syn run folder that has written nothing yet
    empty.mkdir()
    from config import Config
    (empty / "config.json").write_text(json.dumps({"config": Config(metric="Test_gt").to_dict()}))
    code = figures.main(["--nonsyn", str(empty), "--factor", str(runs["Factor"]),
                         "--vae", str(runs["VAE"]), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{empty} has no traversal images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    bare = tmp_path / "bare"  # no config.json: not a run folder of this project
    bare.mkdir()
    assert figures.main(["--nonsyn", str(bare), "--factor", str(runs["Factor"]),
                         "--vae", str(runs["VAE"]), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_without_summary_is_reencoded_from_its_checkpoint(runs, tmp_path):
    """In memory: nothing is written into the source run folder."""
    import shutil
    copy = shutil.copytree(runs["VAE"], tmp_path / "VAE")
    for path in copy.glob("*_gt_*.npz"):
        path.unlink()
    before = _digest(copy)
    step, summary = figures.ground_truth_summary(RunFolder(copy))
    assert step == 8 and summary["pos"].shape == (8, 8, 10)
    assert _digest(copy) == before


@pytest.mark.slow
def test_curves_sample_every_20_steps_from_a_zero_point(tmp_path, runs, capsys):
    folders = []
    for seed in (1, 2):
        assert main(["--grid", "reduced", "--batch_size", "8", "--steps", "40", "--log-interval",
                     "1", "--save-interval", "40", "--gt-interval", "40", "--eval-metrics", "none",
                     "--eval-sample", "200", "--no-cuda", "--nb-test", "2", "--alpha", "5.0",
                     "--omega", "0.9", "--arch", "2018", "--seed", str(seed), "--output_dir",
                     str(tmp_path), "--run-name", f"s{seed}", "--data-dir", str(tmp_path)]) == 0
        folders.append(tmp_path / f"s{seed}")
    out = tmp_path / "misc"
    assert figures.main(["--curves", *map(str, folders), "--curve-steps", "40",
                         "--out", str(out)]) == 0
    for name in ("curves_thesis.png", "curves_per_step.png"):
        assert Image.open(out / name).size[0] > 500
    sampled, per_step = figures.sampled_curves([RunFolder(f) for f in folders], 40)
    steps, syn = sampled["syn"]
    assert steps.tolist() == [0, 20, 40] and syn[:, 0].tolist() == [0, 0]
    for i, folder in enumerate(folders):
        logged = {r["step"]: r["syn"] for r in RunFolder(folder).records("train")}
        assert syn[i, 1:].tolist() == [logged[20], logged[40]]
    row = next(line for line in (out / "curves.md").read_text().splitlines()
               if line.startswith("| syn | 40 |"))
    assert f"{syn[:, 2].mean():.4g}" in row
    # --band: seed 1's mean against the band of seeds 1 and 2 lies inside it at every anchor
    assert figures.main(["--curves", str(folders[0]), "--band", *map(str, folders),
                         "--curve-steps", "40", "--out", str(out), "--force"]) == 0
    table = (out / "curves_vs_band.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| syn | 40 |"))
    assert f"[{syn[:, 2].min():.4g}, {syn[:, 2].max():.4g}] | {syn[0, 2]:.4g} | yes" in row
    assert "anchors inside the band." in table and "| no |" not in table
    # runs logged every 2 steps cannot be sampled at every step
    assert figures.main(["--curves", str(runs["Test_gt"]), "--curve-steps", "8",
                         "--out", str(out), "--force"]) == 2
    assert "--log-interval 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_folder_gives_its_first_finished_trial_of_each_kind(runs, tmp_path, capsys):
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    trials = [("Test_gt", "Test_gt_alpha5.0_omega0.9_seed1", "finished"),
              ("Factor", "Factor_gamma6.4_seed1", "failed"),
              ("Factor", "Factor_gamma6.4_seed2", "finished"),
              ("VAE", "VAE_seed1", "running")]
    for metric, name, state in trials:
        if state == "finished":
            (study_dir / name).symlink_to(runs[metric])
    write = lambda: (study_dir / "study.json").write_text(json.dumps(dict(spec={}, trials=[
        dict(metric=m, name=n, state=s) for m, n, s in trials])))
    write()
    assert figures.main(["--study", str(study_dir), "--out", str(tmp_path / "no")]) == 2
    assert "no finished --metric VAE trial (1 in the study)" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()

    trials[3] = ("VAE", "VAE_seed1", "finished")
    (study_dir / "VAE_seed1").symlink_to(runs["VAE"])
    write()
    out = tmp_path / "misc"
    assert figures.main(["--study", str(study_dir), "--out", str(out)]) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert [row["metric"] for row in table] == ["Test_gt", "Factor", "VAE"]
    assert figures.main(["--study", str(tmp_path), "--out", str(out)]) == 2
    assert "has no study.json" in capsys.readouterr().err


@pytest.mark.slow
def test_the_roles_take_a_run_of_any_objective(runs, tmp_path):
    """latents.png may set Non-Syn VAE beside any objective; --compare lists more runs."""
    out = tmp_path / "misc"
    assert figures.main(["--nonsyn", str(runs["Test_gt"]), "--factor", str(runs["VAE"]),
                         "--vae", str(runs["Factor"]), "--compare", str(runs["Factor"]),
                         "--out", str(out)]) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert [row["metric"] for row in table] == ["Test_gt", "VAE", "Factor", "Factor"]
    assert [row["run"] for row in table] == ["Non-Syn VAE", "VAE", "FactorVAE (gamma 6.4), seed "
                                             "120", "FactorVAE (gamma 6.4), seed 120"]
    assert Image.open(out / "latents.png").size[0] > 500


def test_a_model_title_shrinks_to_its_block_width():
    """A long objective label (bf16, arch, several settings) must not run past its block."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    long = fig.text(0.05, 0.5, "Non-Syn VAE (alpha 5, omega 0.9, arch 2018, bf16), seed 1\n"
                    "step 24,000; labels and mean activations: step 25,000", fontsize=11)
    short = fig.text(0.05, 0.1, "VAE, seed 1", fontsize=11)
    renderer = FigureCanvasAgg(fig).get_renderer()
    assert long.get_window_extent(renderer).width / fig.dpi > 4.0  # too wide before
    figures._fit_width(fig, long, 4.0)
    figures._fit_width(fig, short, 4.0)
    assert long.get_window_extent(renderer).width / fig.dpi <= 4.0 and long.get_fontsize() < 11
    assert short.get_fontsize() == 11


def test_rotation_is_measured_within_each_shape():
    """A latent that follows rotation with opposite curves for squares and ellipses (the shapes'
    symmetries make such curves differ) has a pooled rotation mean of zero; it is still named
    rotation. A latent that follows shape alone is not."""
    from plotting import mean_activations

    orientations = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    mu = np.zeros((3, 2, 40, 2, 2, 3))
    curve = np.cos(2 * orientations)[None, :, None, None]
    mu[0, ..., 0], mu[1, ..., 0] = -curve, curve  # square, ellipse; heart flat
    mu[..., 1] = np.arange(3.0)[:, None, None, None, None]  # z1 follows shape
    summary = mean_activations(mu, scales=[0.5, 1.0], orientations=orientations)
    assert summary["marginal_orientation"][:, 0].var() < 1e-12  # the pooled mean cancels
    factors = latent_factors(summary)
    assert factors[0] == ("rotation", pytest.approx(1.0))
    assert factors[1] == ("shape", pytest.approx(1.0)) and factors[2] == ("inactive", 0.0)


# --- damaged inputs (issue: reliability round 4, section 4) ---------------------------------------

def _copy_runs(runs, tmp_path):
    import shutil
    copies = {m: tmp_path / "src" / m for m in runs}
    for metric, path in runs.items():
        shutil.copytree(path, copies[metric])
    return copies


def _args(runs, out):
    return ["--nonsyn", str(runs["Test_gt"]), "--factor", str(runs["Factor"]), "--vae",
            str(runs["VAE"]), "--out", str(out)]


def _digest(folder):
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_lines_of_metrics_jsonl_that_are_not_records_are_left_out_with_a_warning(
        runs, tmp_path, caplog):
    """A line that is a list, lacks "kind", is garbage, holds 1e308 or -Infinity, or is 3 MB
    long, mid-file: the figures are made from the other records with one warning naming the
    lines, and the exported copy holds the records alone (the 200 MB line went through)."""
    runs = _copy_runs(runs, tmp_path)
    log = runs["Test_gt"] / "metrics.jsonl"
    good = log.read_text().splitlines(keepends=True)
    train = json.loads(good[0])
    bad = ["[1, 2, 3]\n", json.dumps({"step": 3, "recon": 1.0}) + "\n", "}}garbage{{\n",
           json.dumps(dict(train, recon=1e308)) + "\n",
           json.dumps(dict(train, kl=float("-inf"))) + "\n",
           json.dumps(dict(train, pad="x" * 3_000_000)) + "\n"]
    log.write_text("".join(good[:2] + bad + good[2:]))
    with caplog.at_level("WARNING"):
        assert figures.main(_args(runs, tmp_path / "out")) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if "not records" in r.getMessage())
    assert "6 line(s) are not records" in warning and "line 3: a JSON list" in warning
    exported = (tmp_path / "out/runs/Test_gt/metrics.jsonl").read_text()
    assert exported == figures.without_machine_paths("".join(good))
    assert "1e+308" not in exported and "Infinity" not in exported and "xxxx" not in exported


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["ground-truth npz", "traversal png", "unknown metric",
                                    "memory"])
def test_a_damaged_input_is_one_line_and_leaves_an_existing_out_as_it_was(
        runs, tmp_path, capsys, monkeypatch, damage):
    """Each failure is one line with its exit code, and the figures of an earlier call in --out
    are neither replaced nor mixed with a partial new set (it is made in a temporary folder
    and moved into place at the end)."""
    runs = _copy_runs(runs, tmp_path)
    out = tmp_path / "out"
    assert figures.main(_args(runs, out)) == 0
    before = _digest(out)
    capsys.readouterr()
    nonsyn = RunFolder(runs["Test_gt"])
    if damage == "ground-truth npz":
        path = nonsyn.gt_summaries()[-1][1]
        path.write_bytes(path.read_bytes()[:100])
        expected, code = f"{path} cannot be read", 2
    elif damage == "traversal png":
        path = nonsyn.traversals()[1][1]
        path.write_bytes(b"\x89PNG not really")
        expected, code = f"{path} cannot be read as an image", 2
    elif damage == "unknown metric":
        record = json.loads((runs["VAE"] / "config.json").read_text())
        record["config"]["metric"] = "NoSuchVAE"
        (runs["VAE"] / "config.json").write_text(json.dumps(record))
        expected, code = "metric must be one of", 2
    else:
        def no_memory(*args):
            raise MemoryError
        monkeypatch.setattr(figures, "comparison_table", no_memory)
        expected, code = "out of memory while making the figures", 3
    assert figures.main(_args(runs, out) + ["--force"]) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert _digest(out) == before
    assert not list(out.glob(".figures-*"))


def test_an_out_that_holds_figures_needs_force(tmp_path, capsys):
    """figures.py wrote into misc/ by default, over the shipped figures and runs."""
    (tmp_path / "latents.png").write_bytes(b"shipped")
    args = ["--nonsyn", "a", "--factor", "b", "--vae", "c", "--out", str(tmp_path)]
    assert figures.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds figures (latents.png)" in err and "--force" in err
    assert figures.main(args + ["--force"]) == 2  # past the check: the runs are missing
    assert "--force" not in capsys.readouterr().err
    assert (tmp_path / "latents.png").read_bytes() == b"shipped"


def test_an_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_:
        figures.main(["--curves", str(tmp_path), "--out", str(tmp_path / "afile/sub")])
    assert exit_.value.code == 2
    assert f"{tmp_path / 'afile'} is a file" in capsys.readouterr().err


def test_records_are_read_in_bounded_memory_and_bad_lines_named(tmp_path, caplog):
    """An overlong line is skipped a chunk at a time, never held whole; a torn last line and
    other non-records are named in one warning."""
    import tracemalloc
    from runfolder import RECORD_LIMIT
    record = json.dumps(dict(kind="train", step=1, recon=1.0)) + "\n"
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(record)
        f.write('{"kind": "train", "step": 2, "pad": "' + "x" * (20 * RECORD_LIMIT) + '"}\n')
        f.write(record.replace('"step": 1', '"step": 3'))
        f.write('{"kind": "eval", "step": 4, "sco')
    tracemalloc.start()
    with caplog.at_level("WARNING"):
        found = RunFolder(tmp_path).records()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r["step"] for r in found] == [1, 3]
    assert peak < 4 * RECORD_LIMIT * 4  # a few chunks, not the 20 MB line
    assert "2 line(s) are not records" in caplog.text and "line 4: not JSON (torn" in caplog.text


@pytest.mark.slow
def test_evidence_tables_and_figures_from_a_study_folder(runs, tmp_path, capsys):
    """figures.py --evidence reads each trial's ground-truth summary and evaluation at --at:
    the tables' numbers are the runs' own."""
    import shutil
    study = tmp_path / "study"
    trials = []
    for metric, path in runs.items():
        shutil.copytree(path, study / path.name)
        trials.append(dict(name=path.name, metric=metric, seed=1, state="finished"))
    (study / "study.json").write_text(json.dumps(dict(spec=None, trials=trials)))
    out = tmp_path / "evidence"
    assert figures.main(["--evidence", str(study), "--at", "8", "--out", str(out)]) == 0
    claims = json.loads((out / "claims.json").read_text())
    assert [r["run"] for r in claims["runs"]] == ["Test_gt", "Factor", "VAE"]
    for record in claims["runs"]:
        final = json.loads((study / record["run"] / "metrics.json").read_text())["evaluations"][-1]
        assert record["values"]["mig"] == final["scores"]["mig"]["score"]
        assert record["values"]["i_max"] == final["measures"]["i_max"]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["rows"][0]["objective"].startswith("Non-Syn VAE")
    assert "1 of 1" in (out / "claims.md").read_text() or "0 of 1" in (out / "claims.md").read_text()
    for name in ("seeds.png", "scores_over_training.png"):
        assert Image.open(out / name).size[0] > 300
    for trial in trials:  # every finished trial's records and final weights, as misc/runs keeps
        kept = out / "runs" / trial["name"]
        summaries = [p.name for _, p in RunFolder(study / trial["name"]).gt_summaries()]
        assert summaries and sorted(p.name for p in kept.iterdir()) == sorted(
            ["config.json", "metrics.json", "metrics.jsonl", "model.pt", *summaries])
        assert RunFolder(kept).holds_finished_export()  # what study.py --import-finished takes
        assert RunFolder(kept).read_config()["config"]["data_dir"] is None
    timing = json.loads((out / "wallclock.json").read_text())
    assert [(t["run"], t["steps"], t["state"]) for t in timing] == [
        (t["name"], RunFolder(study / t["name"]).records("train")[-1]["step"], "finished")
        for t in trials]
    capsys.readouterr()
    assert figures.main(["--evidence", str(study), "--at", "4", "--out", str(tmp_path / "x")]) == 2
    assert "no run has reached step 4 yet" in capsys.readouterr().err


@pytest.mark.slow
def test_the_figures_of_a_folder_of_final_weights_are_drawn_from_the_weights(runs, tmp_path,
                                                                            caplog, monkeypatch):
    """A folder with config.json, metrics.jsonl and the final weights alone (misc/runs/<run>):
    the traversal and the ground-truth summary come from the weights, as the run drew them
    (the same pixels), latents.png and VAE_traversals.png are drawn, the GIF, which needs the
    traversals saved over training, says so in one line; nothing is written into the sources."""
    from representation import Trained
    nonsyn = RunFolder(runs["Test_gt"])
    step, saved = nonsyn.traversals()[-1]
    trained = Trained.load(nonsyn, cuda=False)
    assert trained.step == step == 8
    assert np.array_equal(trained.traversal(), np.asarray(Image.open(saved)))
    with np.load(nonsyn.gt_summaries()[-1][1]) as stored:
        summary = trained.ground_truth_summary()
        assert all(np.allclose(summary[k], stored[k], atol=1e-6) for k in stored.files)
    shipped = tmp_path / "shipped"
    assert figures.main(_args(runs, shipped)) == 0
    sources = {m: shipped / "runs" / m for m in runs}
    before = _digest(shipped / "runs")
    monkeypatch.chdir(tmp_path / "shipped")  # the defaults: a new folder, not misc/ or a source
    with caplog.at_level("WARNING"):
        assert figures.main(_args(sources, "")[:-2]) == 0
    (default,) = (tmp_path / "shipped" / "figures").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}", default.name) and (default / "latents.png").is_file()
    (tmp_path / "again").mkdir()
    with caplog.at_level("WARNING"):
        assert figures.main(_args(sources, tmp_path / "again")) == 0
    assert "traversals.gif needs the traversal images" in caplog.text
    for name in ("latents.png", "VAE_traversals.png", "traversal_labelled.png", "plots.png",
                 "comparison.md"):
        assert (tmp_path / "again" / name).is_file(), name
    assert not (tmp_path / "again" / "traversals.gif").exists()
    assert _digest(shipped / "runs") == before
    assert (tmp_path / "again" / "comparison.md").read_text() == \
        (shipped / "comparison.md").read_text().replace(str(runs["Test_gt"].parent),
                                                       str(shipped / "runs"))
