"""The settings table (config.py) and what is derived from it, and the layout's rules: each
setting defined once, the parser and docs/cli.md generated from it, no module importing an
entry point, a README that reads in one screen with a true layout table."""
import ast
import dataclasses
import re

import pytest

import config
from conftest import ROOT

ENTRY_POINTS = {"run", "study", "evaluate", "figures", "benchmark", "visdom_assets"}


def test_every_setting_has_one_flag_in_both_spellings_and_every_flag_one_setting():
    parser = config.build_parser()
    dests = {a.dest for a in parser._actions if a.option_strings}
    assert dests - set(config.SETTINGS) == {"help", "download", "resume", "dry_run"}
    assert set(config.SETTINGS) <= dests
    flags = {f for a in parser._actions for f in a.option_strings}
    for name in config.SETTINGS:
        flag = config.flag_of(name)
        assert flag in flags, name
        if "_" in flag[2:] or "-" in flag[2:]:
            other = "--" + (flag[2:].replace("_", "-") if "_" in flag[2:]
                            else flag[2:].replace("-", "_"))
            assert other in flags, (name, other)


def test_the_parser_defaults_are_the_configs():
    args = config.build_parser().parse_args([])
    assert config.make_config(args) == config.Config()


def test_resumable_settings_and_implied_settings_are_as_the_checkpoint_formats_stored_them():
    """The derived tables against their history written out: what a resume may change, and the
    values runs of formats 1-6 were trained with (a checkpoint of each must keep reading)."""
    assert set(config.RESUMABLE) == {
        "steps", "log_interval", "save_interval", "gt_interval", "viz_on", "viz_port",
        "viz_il_iter", "viz_la_iter", "cuda", "data_dir", "eval_metrics", "eval_sample",
        "keep_interval", "scream_image"}
    field = dict(lambda_od=10.0, lambda_d_factor=10.0, c_max=25.0, c_steps=100_000,
                 c_gamma=1000.0)
    field.update(keep_interval=0, scream_image=None)  # formats 6, 7: --keep-interval, the Scream
    i_max = dict(measure_omega=0.9, eval_sample=10_000)
    assert config.IMPLIED_SETTINGS == {
        1: dict(arch="2020", init="current", precision="fp32", **i_max, **field),
        2: dict(precision="fp32", **i_max, **field), 3: dict(i_max, **field), 4: field,
        5: dict(keep_interval=0, scream_image=None), 6: dict(scream_image=None)}
    assert config.CHECKPOINT_FORMAT == 7


def test_bounds_and_choices_come_from_the_table():
    assert config.BOUNDS["omega"] == config.Bound(float, 0, 1, low_open=True)
    assert config.CHOICES["arch"] == config.ARCHS
    with pytest.raises(config.ConfigError, match="omega must be <= 1"):
        config.Config(omega=1.5)
    with pytest.raises(config.ConfigError, match="arch must be one of 2020, 2018"):
        config.Config(arch="2019")
    assert all(f.metadata["help"] for f in dataclasses.fields(config.Config))


def test_docs_cli_md_holds_the_generated_table():
    text = (ROOT / "docs" / "cli.md").read_text()
    table = config.cli_table()
    assert text.endswith(table), ("docs/cli.md differs from config.cli_table(): regenerate it "
                                  "(see its first paragraph)")
    for name in config.SETTINGS:
        assert f"| `{config.flag_of(name)}` |" in table


def _imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_an_entry_point():
    """Entry points are leaves (STYLE): nothing imports run, study, evaluate, figures or
    benchmark (study.py imports itself by name for Ray's workers)."""
    for path in sorted(ROOT.glob("*.py")):
        wrong = _imports(path) & (ENTRY_POINTS - {path.stem})
        assert not wrong, f"{path.name} imports the entry point(s) {sorted(wrong)}"


def test_no_test_module_imports_another():
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        wrong = {n for n in _imports(path) if n.startswith("test_")}
        assert not wrong, f"{path.name} imports {sorted(wrong)}: shared helpers go in conftest"


def test_the_readme_reads_in_one_screen_with_a_true_layout_table():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_000
    headings = re.findall(r"^## (.+)$", readme, flags=re.M)
    order = ["How it works", "Quick start", "The thesis figures", "Objectives", "Studies",
             "What a run writes", "Command line", "Layout", "Deviations", "Citing"]
    positions = [next(i for i, h in enumerate(headings) if h.startswith(o)) for o in order]
    assert positions == sorted(positions), headings
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w./]+\.py)`", layout))
    modules = {p.name for p in ROOT.glob("*.py")}
    assert named - {"conftest.py"} == modules, (sorted(named ^ modules))


def test_c_max_is_bounded_below_what_torch_full_overflows():
    """AnnealedVAE with c_max 1e39 overflowed torch.full (a raw RuntimeError)."""
    with pytest.raises(config.ConfigError, match="c_max must be <= 1000000.0"):
        config.Config(metric="AnnealedVAE", c_max=1e39)
    with pytest.raises(SystemExit):
        config.build_parser().parse_args(["--c_max", "1e39"])


@pytest.mark.parametrize("settings, stem", [
    (dict(metric="Test_gt", alpha=5.0), "alpha_5.0"),  # the original's names
    (dict(metric="Factor", gamma=6.4), "Factor_gamma6.4"),
    (dict(metric="VAE"), "VAE"),
    (dict(metric="DIPVAE1"), "DIPVAE1_lambda_od10.0_lambda_d_factor10.0")])
def test_files_named_by_step_carry_only_the_settings_of_their_objective(settings, stem):
    from runfolder import RunFolder
    cfg = config.Config(**settings)
    assert config.file_stem(cfg) == stem
    folder = RunFolder("r")
    assert folder.gt_plot_path(cfg, 5000).name == f"{stem}_gt_5000.png"
    assert folder.traversal_path(cfg, 2).name == f"{stem}_traversal_2.png"
    if cfg.metric != "Test_gt":
        assert "alpha" not in folder.gt_summary_path(cfg, 5).name
