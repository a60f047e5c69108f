"""Analysis: effective rank (closed forms, both definitions), rank probes, tables from hand-made stores in
the content-addressed layout (exact Markdown), status from views and claims, report, paper map, and
method order / colours derived for every registered method."""

from __future__ import annotations

import datetime as dt
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from analysis.curves import ema, plot_curves
from analysis.formats import MetricSpec
from analysis.store import PAPER_METHODS, Stat, load_runs, method_order, ordered
from analysis.style import PALETTE, method_colors
from analysis.tables import (
    GLUE_COLUMNS,
    ablation_select_table,
    commonsense_table,
    glue_table,
    math_code_table,
    regenerate,
    sweep_table,
)
from astra.erank import (
    by_module_type,
    covariance_effective_rank,
    effective_rank,
    lowrank_singular_values,
    module_type,
    release_effective_rank,
    spectrum_effective_rank,
)
from astra.probes import RankProbeCallback
from astra.results import (
    EvalInfo,
    RunInfo,
    RunResult,
    TrainInfo,
    mark_view,
    run_path,
    signature_of,
    write_result,
)
from tests.conftest import REPO

# ---------------------------------------------------------------- effective rank: closed forms


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_uniform_spectrum_has_effective_rank_n(n: int) -> None:
    assert spectrum_effective_rank(torch.full((n,), 3.5)) == pytest.approx(n, rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    assert effective_rank(2.0 * q) == pytest.approx(n, rel=1e-9)  # orthogonal: all singular values 2
    assert release_effective_rank(torch.full((n,), 3.5)) == pytest.approx(n, rel=1e-6)


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


def test_release_effective_rank_closed_forms_and_difference_from_roy_vetterli() -> None:
    """The release's definition: p = clamp(s, eps) / sum, exp(-sum p log(p + eps)), in float32."""
    # p = (0.8, 0.2): erank = exp(-(0.8 ln 0.8 + 0.2 ln 0.2)) (eps shifts it by ~1e-8)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert release_effective_rank(torch.tensor([4.0, 1.0])) == pytest.approx(math.exp(h), rel=1e-6)
    assert spectrum_effective_rank(torch.tensor([4.0, 1.0])) == pytest.approx(math.exp(h), rel=1e-12)
    # a zero eigenvalue: Roy-Vetterli drops it (exactly 2); the release clamps it to eps and adds
    # -p log(p + eps) with p = eps / 2: 2 * exp(eps/2 * (ln 2 - ln(1.5 eps))) to first order, > 2
    spectrum = torch.tensor([1.0, 1.0, 0.0])
    assert spectrum_effective_rank(spectrum) == 2.0
    eps = 1e-8
    s = torch.tensor([1.0, 1.0, eps], dtype=torch.float32)
    p = s / s.sum()
    direct = float(torch.exp(-(p * torch.log(p + eps)).sum()))  # the release's lines, in float32
    assert release_effective_rank(spectrum) == direct
    # all-zero spectrum: Roy-Vetterli says 0 (no spectrum), the release a flat spectrum of eps
    assert spectrum_effective_rank(torch.zeros(3)) == 0.0
    assert release_effective_rank(torch.zeros(3)) == pytest.approx(3.0, rel=1e-6)


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


# ---------------------------------------------------------------- hand-made stores in the content-addressed layout

SPECS = {
    "accuracy": {"kind": "fraction", "higher_is_better": True},
    "f1": {"kind": "fraction", "higher_is_better": True},
    "matthews": {"kind": "score", "higher_is_better": True},
    "n_eval": {"kind": "count", "higher_is_better": True},
    "throughput/samples_per_s": {"kind": "rate", "higher_is_better": True},
    "gsm8k/accuracy": {"kind": "fraction", "higher_is_better": True},
    "math500/accuracy": {"kind": "fraction", "higher_is_better": True},
    "gsm8k/n": {"kind": "count", "higher_is_better": True},
    "humaneval/pass@1": {"kind": "fraction", "higher_is_better": True},
    "mbpp/pass@1": {"kind": "fraction", "higher_is_better": True},
    "gen/ARC-Easy/accuracy": {"kind": "fraction", "higher_is_better": True},
    "loglik/boolq/acc": {"kind": "fraction", "higher_is_better": True},
}


def _run(name: str, task: str, seed: int, metrics: dict, status: str = "success", **cfg) -> RunResult:
    """A result whose signature is its config's, as the pipeline writes it; specs for its metrics."""
    config = {"method": {"name": name, **cfg.pop("method", {})}, "seed": seed, "model": {"name": "m"},
              "task": {"name": task, "main_metric": "matthews" if task == "glue/cola" else "accuracy"}, **cfg}  # fmt: skip
    info = TrainInfo(history=[{"step": i, "loss": 1.0 / i, "grad_norm": 0.5 + seed} for i in range(1, 6)],
                     init_seconds=0.5 + seed, trainable_params=100, total_params=1000)  # fmt: skip
    specs = {k: SPECS[k] for k in metrics}
    run_info = RunInfo(
        signature_of(config, []), "s", status, config, error="Traceback\nOSError: disk" * (status == "failed")
    )
    return RunResult(run_info, info, EvalInfo(metrics=metrics, metric_specs=specs))


def _store(root: Path, views: dict[str, list[RunResult]]) -> Path:
    """`root/runs/<sig>.json` for every run, `root/views/<sweep>/<sig>` for its sweeps."""
    for sweep, runs in views.items():
        for run in runs:
            write_result(run_path(root, run.run_info.signature), run)
            mark_view(root, sweep, run.run_info.signature)
    return root


def _glue_runs() -> list[RunResult]:
    return [
        _run("lora", "glue/mrpc", 0, {"accuracy": 0.80, "f1": 0.9, "n_eval": 408, "throughput/samples_per_s": 12.0}),
        _run("lora", "glue/mrpc", 1, {"accuracy": 0.82, "f1": 0.9, "n_eval": 408, "throughput/samples_per_s": 13.0}),
        _run("astra", "glue/mrpc", 0, {"accuracy": 0.84, "f1": 0.91, "n_eval": 408}),
        _run("astra", "glue/mrpc", 1, {"accuracy": 0.86, "f1": 0.93, "n_eval": 408}),
        _run("astra", "glue/cola", 0, {"matthews": 0.55, "n_eval": 1043}),
        _run("lora", "glue/cola", 0, {}, status="failed"),
    ]  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return _store(tmp_path / "results", {"s": _glue_runs()})


def test_glue_table_markdown_from_hand_made_store(store: Path) -> None:
    table = glue_table(load_runs(store, "s"))
    assert table.to_markdown() == (
        "**GLUE dev (each task's main metric)**\n\n"
        "| Method | MNLI | SST-2 | CoLA (×100) ↑ | QQP | QNLI | RTE | MRPC (%) ↑ | STS-B | Avg (×100) ↑ | seeds |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| lora | - | - | - | - | - | - | 81.00 ± 1.41 | - | - | 2 |\n"
        "| astra | - | - | 55.00 (n=1) | - | - | - | **85.00 ± 1.41** | - | - | 2 |\n\n"
        "Mean ± std over seeds (sample std); `(n=k)`: a cell over k runs, fewer than the row's seeds; "
        "`-`: no successful run.\n"
    )
    latex = table.to_latex()
    assert "\\textbf{85.00$_{\\pm 1.41}$}" in latex and "55.00 (n=1)" in latex
    assert "CoLA ($\\times$100) $\\uparrow$" in latex and "MRPC (\\%) $\\uparrow$" in latex


def test_overview_formats_by_kind_never_counts_or_rates_as_percent(store: Path) -> None:
    runs = [r for r in load_runs(store, "s") if r.run_info.config["task"]["name"] == "glue/mrpc"]
    table = sweep_table(runs, expected=["pissa", "lora"])
    assert table.to_markdown().splitlines()[2:7] == [
        "| Method | accuracy (%) ↑ | f1 (%) ↑ | throughput/samples_per_s (/s) ↑ | n_eval (count) | init (s) "
        "| trainable params | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| lora | 81.00 ± 1.41 | 90.00 ± 0.00 | 12.50 ± 0.71 | 408 | 1.00 ± 0.71 | 100 (10.00%) | 2 |",
        "| pissa | - | - | - | - | - | - | 0 |",
        "| astra | **85.00 ± 1.41** | **92.00 ± 1.41** | - | 408 | 1.00 ± 0.71 | 100 (10.00%) | 2 |",
    ]


def test_metric_spec_formats_and_undeclared_metrics_print_as_stored() -> None:
    two = Stat.of([0.5, 0.7])
    assert MetricSpec("fraction", True).cell(two) == "60.00 ± 14.14"
    assert MetricSpec("count", True).cell(Stat.of([10, 12])) == "11 ± 1"
    assert MetricSpec("count", True).header("n") == "n (count)"  # no arrow: a count is not ranked
    assert MetricSpec("loss", False).header("eval_loss") == "eval_loss ↓"
    assert MetricSpec("seconds", False).cell(Stat.of([2.0]), seeds=3) == "2.00 (n=1)"
    assert MetricSpec().cell(two) == "0.6 ± 0.1414" and MetricSpec().header("x") == "x"
    assert MetricSpec.of({"kind": "percentage"}) == MetricSpec()  # an unknown kind is not guessed
    assert MetricSpec("fraction", True).cell(Stat()) == "-"


def test_average_over_seeds_that_have_every_task() -> None:
    runs = [
        _run("lora", f"glue/{t}", s, {"accuracy": v})
        for s, (t, v) in enumerate([("rte", 0.6), ("mrpc", 0.8)])
    ]
    assert glue_table(runs).cells[0][-2:] == ["-", "2"]  # six GLUE tasks missing
    math_runs = [_run("lora", "metamath", 0, {"gsm8k/accuracy": 0.5, "math500/accuracy": 0.1, "gsm8k/n": 9}),
                 _run("lora", "code", 0, {"humaneval/pass@1": 0.2, "mbpp/pass@1": 0.4}),
                 _run("lora", "metamath", 1, {"gsm8k/accuracy": 0.7, "math500/accuracy": 0.3, "gsm8k/n": 9})]  # fmt: skip
    table = math_code_table(math_runs)
    assert table.columns == [
        "GSM8K (%) ↑",
        "MATH (%) ↑",
        "HumanEval (%) ↑",
        "MBPP (%) ↑",
        "Avg (%) ↑",
        "seeds",
    ]
    # seed 1 lacks the code tasks: the average is seed 0's alone, and says so
    assert table.cells == [
        ["60.00 ± 14.14", "20.00 ± 14.14", "20.00 (n=1)", "40.00 (n=1)", "30.00 (n=1)", "2"]
    ]
    cs = commonsense_table(
        [_run("lora", "commonsense", 0, {"gen/ARC-Easy/accuracy": 0.7, "loglik/boolq/acc": 0.9})]
    )
    assert cs.cells == [["-", "-", "-", "-", "-", "70.00", "-", "-", "-", "1"]]


def test_ablation_table_rows_are_the_ablated_values() -> None:
    runs = [
        _run("astra", "glue/rte", 0, {"accuracy": 0.70}, method={"select": "tail"}),
        _run("astra", "glue/rte", 1, {"accuracy": 0.72}, method={"select": "tail"}),
        _run("astra", "glue/rte", 0, {"accuracy": 0.60}, method={"select": "head"}),
    ]
    table = ablation_select_table(runs)
    assert table.rows == ["astra (select=head)", "astra (select=tail)"]
    assert table.columns == ["RTE (%) ↑", "seeds"] and table.cells == [["60.00", "1"], ["71.00 ± 1.41", "2"]]
    assert table.bold == {(1, 0)}
    assert ablation_select_table(runs[:2]) is None  # nothing ablated
    toy = [
        _run("astra", "toy/parity", 0, {"accuracy": v}, method={"select": k})
        for k, v in (("tail", 0.9), ("head", 0.5))
    ]
    assert ablation_select_table([*runs, *toy]).columns == [
        "RTE (%) ↑",
        "toy/parity (%) ↑",
        "Avg (%) ↑",
        "seeds",
    ]


def test_unsigned_fields_are_not_ablation_axes() -> None:
    runs = [
        _run("lora", "glue/rte", s, {"accuracy": 0.7}, method={"cache": c})
        for s, c in ((0, True), (1, False))
    ]
    for run in runs:
        run.run_info.unsigned = ["method.cache"]
    assert list(sweep_table(runs).rows) == ["lora"]


def test_stat_is_mean_and_sample_std() -> None:
    xs = [0.1, 0.4, 0.7]
    stat = Stat.of([*xs, None, math.nan])
    assert (stat.n, stat.mean, stat.std) == (3, pytest.approx(np.mean(xs)), pytest.approx(np.std(xs, ddof=1)))


# ---------------------------------------------------------------- paired comparisons


@pytest.mark.parametrize("wins,losses", [(5, 0), (7, 3), (2, 2), (0, 4), (12, 1)])
def test_sign_test_equals_scipy_binomial_test(wins: int, losses: int) -> None:
    from scipy.stats import binomtest

    from analysis.compare import sign_test_p

    assert sign_test_p(wins, losses) == pytest.approx(binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-12)
    assert sign_test_p(0, 0) == 1.0


def test_sign_flip_test_exact_and_monte_carlo() -> None:
    from analysis.compare import sign_flip_p

    # sums of (+-1, +-2, +-3): |sum| >= 6 for 2 of the 8 sign patterns
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert sign_flip_p([0.0, 0.0]) == 1.0 and sign_flip_p([]) == 1.0
    x = np.random.default_rng(1).normal(0.5, 1.0, 17)  # 17 pairs: Monte Carlo path
    signs = np.array(np.meshgrid(*[[1.0, -1.0]] * 17)).reshape(17, -1).T  # all 2^17 patterns
    exact = np.mean(np.abs(signs @ x) >= abs(x.sum()) * (1 - 1e-12))
    assert sign_flip_p(x) == pytest.approx(exact, abs=0.015)


def test_comparison_table_pairs_on_benchmark_and_seed(store: Path) -> None:
    from analysis.tables import comparison_table

    table = comparison_table(load_runs(store, "s"), "glue")
    # MRPC seeds 0 and 1: astra 84 / 86 vs lora 80 / 82 -> +4 points twice; CoLA: lora's run failed
    assert table.to_markdown().splitlines()[2:5] == [
        "| A vs B | pairs | wins / ties / losses | mean diff (A - B) | sign test p | sign-flip p |",
        "|---|---:|---:|---:|---:|---:|",
        "| astra vs lora | 2 | 2 / 0 / 0 | +4.00 ± 0.00 | 0.5 | 0.5 |",
    ]
    loss = [_run(m, "glue/rte", s, {"accuracy": v}) for m, s, v in (("astra", 0, 0.6), ("lora", 0, 0.7))]
    assert comparison_table(loss, "glue").cells == [["1", "0 / 0 / 1", "-10.00", "1", "1"]]
    assert comparison_table([loss[1]], "glue") is None  # no challenger


# ---------------------------------------------------------------- views, status, regenerate, report


def test_a_run_shared_by_two_views_is_one_file_read_by_both(tmp_path: Path) -> None:
    shared, only = (
        _run("lora", "glue/rte", 0, {"accuracy": 0.7}),
        _run("astra", "glue/rte", 0, {"accuracy": 0.8}),
    )
    root = _store(tmp_path, {"table": [shared, only], "ablation": [shared]})
    assert len(list((root / "runs").glob("*.json"))) == 2
    assert [r.run_info.signature for r in load_runs(root, "ablation")] == [shared.run_info.signature]
    written = regenerate(root, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert "ablation__overview.md" in names and "table__overview.md" in names and "table_curves.png" in names
    assert "table__math_code.md" not in names  # a table of `-` only (seed counts aside) is not written
    assert "| lora | 70.00 |" in (tmp_path / "out" / "tables" / "ablation__overview.md").read_text()


def test_status_from_views_results_and_claims(store: Path) -> None:
    from analysis.status import format_status, sweep_status

    mark_view(store, "s", "000000000000")  # started, died without a result
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    claims = {
        "111111111111": {"host": "elsewhere", "pid": 7, "started_at": now, "token": "t"},  # live, other host
        "444444444444": {
            "host": socket.gethostname(),
            "pid": 2**22 + 1,
            "started_at": now,
            "token": "t",
        },  # pid gone
        "555555555555": {
            "host": "elsewhere",
            "pid": 7,
            "started_at": "2026-01-01T00:00:00+00:00",
            "token": "t",
        },
    }  # the last is older than the timeout
    (store / "claims").mkdir()
    for sig, claim in claims.items():
        mark_view(store, "s", sig)
        (store / "claims" / f"{sig}.claim").write_text(json.dumps(claim))
    failed_sig = _glue_runs()[-1].run_info.signature  # a rerun of the failed run, claimed: running
    (store / "claims" / f"{failed_sig}.claim").write_text(json.dumps(claims["111111111111"]))
    bad = _glue_runs()[0]
    mark_view(store, "s", "222222222222")
    run_path(store, "222222222222").write_text(json.dumps(bad.to_dict()))  # holds another signature
    states = {r.signature: r for r in sweep_status(store, "s", expected=["333333333333"])}
    missing = ("000000000000", "333333333333", "444444444444", "555555555555")
    assert [states[sig].state for sig in missing] == [
        "missing"
    ] * 4  # no result; stale claims count for nothing
    assert states["111111111111"].state == "running"
    assert states["111111111111"].detail == f"claimed by host elsewhere, pid 7, since {now}"
    assert states["222222222222"].state == "failed" and "holds run" in states["222222222222"].detail
    rerun = states[failed_sig]
    assert (rerun.state, rerun.describe()) == ("running", "lora / glue/cola / seed 0")
    (store / "claims" / f"{failed_sig}.claim").unlink()
    again = sweep_status(store, "s")
    assert [(r.state, r.detail) for r in again if r.signature == failed_sig] == [("failed", "OSError: disk")]
    text = format_status("s", again)
    assert text.splitlines()[0] == "sweep s: 11 runs: 5 present, 2 failed, 1 running, 3 missing"


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
    assert "6 runs in the view `s`: 5 present, 1 failed, 0 running, 0 missing" in text
    assert (
        "data:image/png;base64," in html.read_text() and "(lora / glue/cola / seed 0): OSError: disk" in text
    )


# ---------------------------------------------------------------- paper map


def test_paper_items_name_existing_sweeps_and_read_their_views(tmp_path: Path) -> None:
    from experiments.paper import PAPER, item, item_runs, write_item

    sweeps = {p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")}
    named = {s for p in PAPER for s in (*p.sweeps, *p.mini)}
    assert named <= sweeps, f"paper items name sweeps without a file: {sorted(named - sweeps)}"
    assert len({p.id for p in PAPER}) == len(PAPER)
    shared = _run("astra", "glue/rte", 0, {"accuracy": 0.8}, method={"select": "tail"})
    head = _run("astra", "glue/rte", 0, {"accuracy": 0.6}, method={"select": "head"})
    root = _store(tmp_path, {"ablation_select": [shared, head], "glue_table1": [shared]})
    assert len(item_runs(root, item("ablation_select"))) == 2
    written = write_item(root, item("ablation_select"), tmp_path / "out")
    assert [p.name for p in written] == ["paper_ablation_select.md", "paper_ablation_select.tex"]
    assert "| astra (select=tail) | **80.00** | 1 |" in written[0].read_text()
    lora = _run("lora", "glue/rte", 0, {"accuracy": 0.7})
    root = _store(tmp_path / "glue", {"glue_table1": [shared, lora]})
    written = write_item(root, item("glue"), tmp_path / "out_glue")
    assert [p.name for p in written] == [
        "paper_glue.md", "paper_glue.tex", "paper_glue_paired.md", "paper_glue_paired.tex", "paper_glue_curves.png"
    ]  # fmt: skip


def test_demo_report_prints_the_view_and_writes_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.demo_report import main

    root = _store(tmp_path, {"demo": _glue_runs()[:4]})
    mark_view(root, "demo", "000000000000")  # a run that died
    main(["--results-dir", str(root)])
    out = capsys.readouterr().out
    assert out.startswith("**Demo `demo`: 5 runs: 4 present, 0 failed, 0 running, 1 missing**")
    assert "| astra | **85.00 ± 1.41** |" in out and "missing: 000000000000 -" in out
    assert (root / "figures" / "demo_curves.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- lists derived from the registry


def _registered_methods() -> set[str]:
    from astra.methods import load_methods

    presets = {p.stem for p in (REPO / "conf" / "method").glob("*.yaml")}
    return set(load_methods()) | presets


def test_paper_method_preferences_are_registered_methods() -> None:
    from analysis.compare import CHALLENGERS

    missing = (set(PAPER_METHODS) | set(CHALLENGERS)) - _registered_methods()
    assert not missing, f"PAPER_METHODS names methods the registry does not know: {sorted(missing)}"


def test_every_registered_method_gets_a_distinct_colour_and_a_position() -> None:
    methods = sorted(_registered_methods() | {"zz_new_method", "aa_new_method"})
    colors = method_colors(methods)
    assert set(colors) >= set(methods) and len(set(colors.values())) == len(colors)
    order = method_order(methods)
    assert sorted(order) == methods  # every method has exactly one position
    assert order[: len(PAPER_METHODS)] == list(PAPER_METHODS) and order[-2:] == [
        "aa_new_method",
        "zz_new_method",
    ]
    # paper methods keep their colour whatever else a figure shows
    assert method_colors(["astra"])["astra"] == colors["astra"] == PALETTE[PAPER_METHODS.index("astra")]
    many = method_colors([f"m{i:02d}" for i in range(40)])
    assert len(set(many.values())) == len(many)  # past the palette: generated, still distinct
    # a table listing methods gives every registered method one row, in that order
    assert sweep_table([], expected=methods).rows == order
    labels = ordered([f"{m} (rank=16)" for m in methods] + [f"{m} (rank=4)" for m in methods])
    assert len(labels) == 2 * len(methods) and labels[:2] == ["full_ft (rank=4)", "full_ft (rank=16)"]


def test_glue_columns_name_the_glue_task_configs() -> None:
    tasks = {p.stem for p in (REPO / "conf" / "task" / "glue").glob("*.yaml")}
    assert {a for c in GLUE_COLUMNS for a in c.aliases} == tasks
