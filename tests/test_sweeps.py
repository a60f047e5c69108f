"""Every sweep file composes and expands; the paper-scale NLG sweeps carry the release's calibration, N and
precision; the mini sweeps stay CPU-sized; the paper map names only sweep files that exist."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from astra.config import run_identity
from astra.pipeline import CONF_DIR, REPO_ROOT, load_registry
from astra.sweeps import expand, sweep_files
from experiments.paper import PAPER

SWEEPS = sweep_files()
MINI = [s for s in SWEEPS if s.startswith("mini_")]


def composed_runs(sweep: str, pairs: tuple[str, ...] = ()) -> list:
    """Composed configs covering `sweep`: every run whose override values (on the `pairs` keys: every
    combination; otherwise each value of each key) were not yet seen. Composing every run of the big
    paper sweeps would take minutes; each value once exercises every option file they name."""
    jobs, seen = expand(sweep), set()
    load_registry()
    configs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            values = dict(o.split("=", 1) for o in job)
            keys = (
                {tuple(values.get(k) for k in pairs)}
                if pairs
                else set(values.items()) - {("seed", values.get("seed"))}
            )
            if keys and keys <= seen and len(configs) > 0:
                continue
            seen |= keys
            configs.append(compose(config_name="config", overrides=[*job, f"sweep={sweep}"]))
    return configs


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_and_expands_to_distinct_runs(sweep):
    jobs = expand(sweep)
    assert jobs, f"{sweep} expands to no run"
    configs = composed_runs(sweep)
    assert all(cfg.sweep.name == ("adhoc" if sweep == "none" else sweep) for cfg in configs)  # view name
    signatures = [run_identity(cfg)[2] for cfg in configs]
    assert len(set(signatures)) == len(signatures)  # no two runs of a sweep share a result


@pytest.mark.parametrize("sweep", ["nlg_math_release", "nlg_code_release", "commonsense_release"])
def test_release_nlg_sweeps_reproduce_release_calibration_and_precision(sweep):
    (cfg,) = composed_runs(sweep)
    assert cfg.method.name == "astra_code" and cfg.method.select == "head"
    assert cfg.method.accum_dtype == "model" and cfg.model.dtype == "bfloat16" and cfg.trainer.bf16
    assert (
        cfg.calib.format == "code_release" and cfg.calib.padding == "max_length" and cfg.calib.drop_last_token
    )
    assert cfg.calib.seq_len == 512 and cfg.calib.batch_size == 1
    assert cfg.calib.n == (64 if sweep.startswith("commonsense") else 256)
    assert (cfg.method.rank, cfg.method.alpha, cfg.trainer.lr, cfg.seed) == (128, 128, 2e-5, 42)
    assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 128 and cfg.task.train_limit == 100_000
    assert set(cfg.method.target_modules) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}


def test_paper_text_nlg_sweeps_share_the_release_setup_but_not_astra_code():
    for sweep in ("nlg_math", "nlg_code", "commonsense"):
        configs = composed_runs(sweep)
        methods = {str(c.method.name) for c in configs}
        assert "astra" in methods and "lora" in methods and "astra_code" not in methods
        assert all(c.calib.format == "code_release" and c.trainer.lr == 2e-5 for c in configs)
        astra = next(c for c in configs if c.method.name == "astra")
        assert astra.method.select == "tail" and astra.method.accum_dtype == "fp32"  # the paper's text


def test_selection_ablation_covers_both_conventions_and_all_selections():
    configs = composed_runs("ablation_select", pairs=("method", "method.select"))
    pairs = {(str(c.method.name), str(c.method.select)) for c in configs}
    assert pairs >= {(m, s) for m in ("astra", "astra_code") for s in ("tail", "head", "middle", "random")}


@pytest.mark.parametrize("sweep", MINI)
def test_mini_sweeps_are_cpu_sized(sweep):
    configs = composed_runs(sweep)
    assert all(c.model.name in ("minilm", "smollm2-135m") for c in configs)
    assert all(c.task.train_limit is not None and c.eval.limit is not None or c.task.family == "glue"
               for c in configs)  # fmt: skip
    text = (CONF_DIR / "sweep" / f"{sweep}.yaml").read_text()
    assert "wall time" in text  # each mini sweep states its (expected, then measured) wall time


def test_mini_comparison_sweeps_have_three_seeds():
    for sweep in ("mini_glue", "mini_select", "mini_calib"):  # mini_nlg: 2 seeds (CPU budget; see its file)
        seeds = {int(o.split("=")[1]) for job in expand(sweep) for o in job if o.startswith("seed=")}
        assert len(seeds) >= 3, sweep


def test_paper_map_names_existing_sweeps_and_minis():
    for item in PAPER:
        for sweep in (*item.sweeps, *item.mini):
            assert sweep in SWEEPS, f"{item.id}: no conf/sweep/{sweep}.yaml"
    assert {p.id for p in PAPER if p.mini} >= {"glue", "math_code", "ablation_select", "erank", "curves"}


def test_paper_scale_sweep_dry_runs_with_cfg_job():
    out = subprocess.run(
        [sys.executable, "-m", "astra.run", "sweep=nlg_math_release", "--cfg", "job"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accum_dtype: model" in out.stdout and "'n': 256" in out.stdout  # YAML quotes the key n


def test_mini_ablations_share_their_default_runs_with_mini_glue():
    """Content-addressed runs: Astra at N = 64 (mini_calib) and with tail selection (mini_select) is
    mini_glue's Astra run, so each is computed once."""

    def signature(sweep: str, *overrides: str) -> str:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return run_identity(compose(config_name="config", overrides=[f"sweep={sweep}", *overrides]))[2]

    load_registry()
    glue = signature("mini_glue", "method=astra", "seed=1")
    assert signature("mini_calib", "method=astra", "calib.n=64", "seed=1") == glue
    assert signature("mini_select", "method=astra", "method.select=tail", "seed=1") == glue
    assert signature("mini_calib", "method=astra", "calib.n=8", "seed=1") != glue
