"""Analysis: effective rank (closed forms), rank probes, paper tables from a hand-made store, status, report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from analysis.curves import ema, plot_curves
from analysis.effective_rank import (
    by_module_type,
    covariance_effective_rank,
    effective_rank,
    lowrank_singular_values,
    module_type,
    spectrum_effective_rank,
)
from analysis.store import Stat, load_runs
from analysis.tables import ablation_select_table, commonsense_table, glue_table, math_code_table, sweep_table
from astra.probes import RankProbeCallback
from astra.results import EvalInfo, RunInfo, RunResult, TrainInfo, write_result
from tests.conftest import REPO, requires_data

# ---------------------------------------------------------------- effective rank: closed forms


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_uniform_spectrum_has_effective_rank_n(n: int) -> None:
    assert spectrum_effective_rank(torch.full((n,), 3.5)) == pytest.approx(n, rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    assert effective_rank(2.0 * q) == pytest.approx(n, rel=1e-9)  # orthogonal: all singular values 2


def test_rank_one_matrix_has_effective_rank_one() -> None:
    u, v = torch.randn(30, 1), torch.randn(1, 20)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_closed_form_and_zero() -> None:
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, erank = 2^1.5
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(2**1.5, rel=1e-9)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    # a covariance with eigenvalues (4, 4, 0) in a rotated basis has effective rank 2
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert covariance_effective_rank(
        q @ torch.diag(torch.tensor([4.0, 4.0, 0.0], dtype=torch.float64)) @ q.T
    ) == (pytest.approx(2.0, rel=1e-9))


def test_lowrank_singular_values_equal_dense_svd() -> None:
    left, right = torch.randn(40, 6, dtype=torch.float64), torch.randn(25, 6, dtype=torch.float64)
    left[:, 5] = left[:, 0]  # rank-deficient product
    dense = torch.linalg.svdvals(left @ right.T)[:6]
    assert torch.allclose(lowrank_singular_values(left, right), dense, atol=1e-9)


def test_module_types_for_bert_llama_deberta() -> None:
    names = {
        "bert.encoder.layer.0.attention.self.query": "q",
        "bert.encoder.layer.0.attention.output.dense": "o",
        "bert.encoder.layer.0.intermediate.dense": "up",
        "bert.encoder.layer.0.output.dense": "down",
        "model.layers.3.self_attn.k_proj": "k",
        "model.layers.3.mlp.gate_proj": "gate",
        "model.layers.3.mlp.down_proj": "down",
        "deberta.encoder.layer.1.attention.self.value_proj": "v",
    }
    assert {n: module_type(n) for n in names} == names
    assert by_module_type({"a.q_proj": 1.0, "b.q_proj": 3.0, "a.v_proj": 5.0}) == {"q": 2.0, "v": 5.0}


# ---------------------------------------------------------------- rank probes on a single layer


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


def test_probe_lora_update_and_adapter_equal_dense_effective_rank() -> None:
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    probe = RankProbeCallback(model, [0], ["proj"])
    assert probe.update_ranks() == {"proj": 0.0} and probe.adapter_ranks() == {"proj": 0.0}  # B = 0
    layer = model.base_model.model.proj
    a0 = layer.lora_A["default"].weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(5, 2))
        layer.lora_A["default"].weight.add_(torch.randn(2, 6))
    s = layer.scaling["default"]
    b, a = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
    assert probe.adapter_ranks()["proj"] == pytest.approx(effective_rank(s * b @ a), rel=1e-9)
    assert probe.update_ranks()["proj"] == pytest.approx(effective_rank(s * b @ a), rel=1e-9)  # B_0 = 0
    assert a0.shape == a.shape


def test_probe_update_is_zero_before_training_for_nonzero_inits() -> None:
    """Astra/PiSSA start with B A != 0; dW at step 0 is exactly zero, not round-off counted as rank."""
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(5, 2))
    probe = RankProbeCallback(model, [0], ["proj"])
    assert probe.update_ranks() == {"proj": 0.0}
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(1e-3 * torch.randn(2, 6))  # one small real step
    assert probe.update_ranks()["proj"] > 1.0


def test_probe_full_ft_rank_one_update_and_masked_output_covariance() -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 7, 6)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    probe = RankProbeCallback(model, [0], ["proj"], batches=[{"x": x, "attention_mask": mask}])
    with torch.no_grad():
        model.proj.weight.add_(torch.outer(torch.randn(5), torch.randn(6)))
    assert probe.update_ranks()["proj"] == pytest.approx(1.0, abs=1e-9)
    y = model.proj(x).detach().double()[mask.bool()]  # (11 real tokens, 5); padding excluded
    cov = (y - y.mean(0)).T @ (y - y.mean(0)) / y.shape[0]
    assert probe.output_cov_ranks()["proj"] == pytest.approx(covariance_effective_rank(cov), rel=1e-9)
    assert probe.adapter_ranks() == {}


# ---------------------------------------------------------------- tables from a hand-made store


def _run(
    sig: str, name: str, task: str, seed: int, metrics: dict, status: str = "success", **cfg
) -> RunResult:
    config = {"method": {"name": name, **cfg.pop("method", {})}, "seed": seed, "model": {"name": "m"},
              "task": {"name": task, "main_metric": "matthews" if task == "glue/cola" else "accuracy"}, **cfg}  # fmt: skip
    info = TrainInfo(history=[{"step": i, "loss": 1.0 / i, "grad_norm": 0.5 + seed} for i in range(1, 6)],
                     init_seconds=0.5 + seed, trainable_params=100, total_params=1000)  # fmt: skip
    return RunResult(RunInfo(sig, "s", status, config), info, EvalInfo(metrics=metrics))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    runs = [
        _run("a", "lora", "glue/mrpc", 0, {"accuracy": 0.80, "f1": 0.9, "n_eval": 408}),
        _run("b", "lora", "glue/mrpc", 1, {"accuracy": 0.82, "f1": 0.9, "n_eval": 408}),
        _run("c", "astra", "glue/mrpc", 0, {"accuracy": 0.84, "f1": 0.91, "n_eval": 408}),
        _run("d", "astra", "glue/mrpc", 1, {"accuracy": 0.86, "f1": 0.93, "n_eval": 408}),
        _run("e", "astra", "glue/cola", 0, {"matthews": 0.55, "n_eval": 1043}),
        _run("f", "lora", "glue/cola", 0, {}, status="failed"),
    ]
    for run in runs:
        write_result(tmp_path / "s" / f"{run.run_info.signature}.json", run)
    return tmp_path


def test_glue_table_markdown_from_hand_made_store(store: Path) -> None:
    table = glue_table(load_runs(store, "s"))
    assert table.to_markdown() == (
        "**GLUE dev (each task's main metric)**\n\n"
        "| Method | MNLI | SST-2 | CoLA | QQP | QNLI | RTE | MRPC | STS-B | Avg |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| lora | - | - | - | - | - | - | 81.00 ± 1.41 | - | - |\n"
        "| astra | - | - | 55.00 | - | - | - | **85.00 ± 1.41** | - | - |\n\n"
        "Mean ± std over seeds, in percent; `-`: no successful run.\n"
    )
    latex = table.to_latex()
    assert (
        "\\textbf{85.00$_{\\pm 1.41}$}" in latex
        and "lora & - & - & - & - & - & - & 81.00$_{\\pm 1.41}$" in latex
    )


def test_average_only_when_every_task_present(tmp_path: Path) -> None:
    runs = [
        _run(f"{t}{s}", "lora", f"glue/{t}", s, {"accuracy": v})
        for s, (t, v) in enumerate([("rte", 0.6), ("mrpc", 0.8)])
    ]
    glue = glue_table(runs)
    assert glue.cells[0][-1] == "-"  # six GLUE tasks missing
    math_runs = [_run("m", "lora", "metamath", 0, {"gsm8k/accuracy": 0.5, "math500/accuracy": 0.1, "gsm8k/n": 9.0}),
                 _run("c", "lora", "code", 0, {"humaneval/pass@1": 0.2, "mbpp/pass@1": 0.4})]  # fmt: skip
    assert math_code_table(math_runs).cells == [["50.00", "10.00", "20.00", "40.00", "30.00"]]
    cs = commonsense_table(
        [_run("x", "lora", "commonsense", 0, {"gen/ARC-Easy/accuracy": 0.7, "loglik/boolq/acc": 0.9})]
    )
    assert cs.cells == [["-", "-", "-", "-", "-", "70.00", "-", "-", "-"]]


def test_ablation_table_rows_are_the_ablated_values() -> None:
    runs = [
        _run("t0", "astra", "glue/rte", 0, {"accuracy": 0.70}, method={"select": "tail"}),
        _run("t1", "astra", "glue/rte", 1, {"accuracy": 0.72}, method={"select": "tail"}),
        _run("h0", "astra", "glue/rte", 0, {"accuracy": 0.60}, method={"select": "head"}),
    ]
    table = ablation_select_table(runs)
    assert table.rows == ["astra (select=head)", "astra (select=tail)"]
    assert table.columns == ["RTE"] and table.cells == [["60.00"], ["71.00 ± 1.41"]]
    assert ablation_select_table(runs[:2]) is None  # nothing ablated


def test_sweep_table_marks_missing_methods_and_counts_are_not_metrics(store: Path) -> None:
    runs = [r for r in load_runs(store, "s") if r.run_info.config["task"]["name"] == "glue/mrpc"]
    table = sweep_table(runs, expected=["pissa", "lora"])
    assert table.columns == ["accuracy", "f1", "init (s)", "trainable params"]
    assert table.rows == ["lora", "pissa", "astra"]
    assert table.cells[1] == ["-", "-", "-", "-"]
    assert table.cells[0][2:] == ["1.00 ± 0.71", "100 (10.00%)"]


def test_stat_is_mean_and_sample_std() -> None:
    xs = [0.1, 0.4, 0.7]
    stat = Stat.of([*xs, None, math.nan])
    assert (stat.n, stat.mean, stat.std) == (3, pytest.approx(np.mean(xs)), pytest.approx(np.std(xs, ddof=1)))


# ---------------------------------------------------------------- curves and report


def test_ema_and_curves_png(store: Path, tmp_path: Path) -> None:
    assert np.allclose(ema(np.full(5, 2.0), 0.9), 2.0)  # bias-corrected: a constant stays constant
    assert np.allclose(ema(np.arange(4.0), 0.0), np.arange(4.0))
    with pytest.raises(ValueError, match="smoothing"):
        ema(np.ones(2), 1.0)
    path = plot_curves([r for r in load_runs(store, "s") if r.ok], tmp_path / "c.png", "s", smooth=0.5)
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


def test_report_embeds_tables_and_figures(store: Path, tmp_path: Path) -> None:
    from analysis.report import write_report

    md, html = write_report(load_runs(store, "s"), "s", tmp_path / "out", store)
    text = md.read_text()
    assert "85.00 ± 1.41" in text and "![s_curves.png](../figures/s_curves.png)" in text
    assert "data:image/png;base64," in html.read_text() and "`f` (lora / glue/cola / seed 0)" in text


# ---------------------------------------------------------------- status against a real multirun


def _seed(overrides: list[str]) -> str:
    return next(o for o in overrides if o.startswith("seed="))


TINY = ["model=tiny-bert", "method=lora", "trainer.max_steps=2", "task.train_limit=32", "eval.limit=16"]


@requires_data
def test_status_lists_present_missing_and_failed(tmp_path: Path) -> None:
    from analysis.status import expected_runs, format_status

    overrides = [
        *TINY,
        f"paths.results_dir={tmp_path / 'res'}",
        f"paths.output_dir={tmp_path / 'out'}",
        "logger=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "astra.run", "sweep=demo", *overrides, "seed=0"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    runs = expected_runs("demo", [*overrides, "seed=0,1"])
    assert [(_seed(r.overrides), r.state) for r in runs] == [("seed=0", "present"), ("seed=1", "missing")]
    failed = json.loads(runs[0].path.read_text())
    failed["run_info"].update(status="failed", error="Traceback ...\nRuntimeError: out of memory")
    runs[1].path.write_text(json.dumps(failed))
    (runs[0].path.parent / "stale.json").write_text(runs[0].path.read_text())
    again = expected_runs("demo", [*overrides, "seed=0,1"])
    assert [(r.state, r.detail) for r in again] == [
        ("present", ""),
        ("failed", "RuntimeError: out of memory"),
    ]
    report = format_status("demo", again)
    assert "1 present, 1 failed, 0 missing, 0 invalid" in report and "stale.json" in report


def test_status_expands_range_and_rejects_unknown_sweep() -> None:
    from analysis.status import expand

    jobs = expand("demo", ["method=lora", "seed=range(0,3)"])
    assert all("method=lora" in job for job in jobs)
    assert sorted(_seed(job) for job in jobs) == ["seed=0", "seed=1", "seed=2"]
    with pytest.raises(SystemExit, match="unknown sweep 'nope'; valid: .*demo"):
        expand("nope")
