"""docs/results.md generator (experiments/verdicts.py) on a hand-made store: the verdict rule, the numbers
behind each verdict, the forgetting table, wall times, and the README section between its markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from astra.results import (
    EvalInfo,
    MetaInfo,
    RunInfo,
    RunResult,
    TrainInfo,
    mark_view,
    run_path,
    signature_of,
    write_result,
)
from experiments import verdicts as v

ACC = {"kind": "fraction", "higher_is_better": True}
LOSS = {"kind": "loss", "higher_is_better": False}


def run(method: str, seed: int, acc: float, task: str = "glue/sst2", forgetting: float | None = None,
        losses: tuple[float, ...] = (1.0, 0.8, 0.6, 0.5), erank: float | None = None, **method_cfg) -> RunResult:  # fmt: skip
    config = {"method": {"name": method, **method_cfg}, "seed": seed, "model": {"name": "minilm"},
              "task": {"name": task, "main_metric": "accuracy", "train_limit": 2000}, "eval": {"limit": None}}  # fmt: skip
    metrics, specs = {"accuracy": acc}, {"accuracy": ACC}
    if forgetting is not None:
        metrics |= {
            "forgetting": forgetting,
            "forgetting/loss_before": 3.0,
            "forgetting/loss_after": 3.0 + forgetting,
        }
        specs |= {k: LOSS for k in metrics if k.startswith("forgetting")}
    probes = [{"step": 10, "update": {"l0": erank, "l1": erank}}] if erank is not None else []
    info = TrainInfo(history=[{"step": i + 1, "loss": x} for i, x in enumerate(losses)], wall_seconds=50.0,
                     rank_probes=probes)  # fmt: skip
    run_info = RunInfo(signature_of(config, []), "s", "success", config,
                       started_at=f"2026-12-01T10:00:{seed:02d}+00:00", finished_at=f"2026-12-01T10:01:{seed:02d}+00:00")  # fmt: skip
    return RunResult(
        run_info, info, EvalInfo(metrics, specs), MetaInfo(device="cpu:x86_64", dataset_used="sst2")
    )


def store(root: Path, views: dict[str, list[RunResult]]) -> Path:
    for sweep, runs in views.items():
        for r in runs:
            write_result(run_path(root, r.run_info.signature), r)
            mark_view(root, sweep, r.run_info.signature)
    return root


def test_verdict_rule():
    assert v.verdict([1.0, 2.0]) == (v.UNJUDGED, None)  # too few pairs
    decision, p = v.verdict([1.0, 1.1, 0.9, 1.05])
    assert decision == v.HOLDS and p < 0.05
    assert v.verdict([-1.0, -1.1, -0.9, -1.05])[0] == v.FAILS
    assert v.verdict([1.0, -1.0, 0.5])[0] == v.UNJUDGED  # no significant difference
    assert v.verdict([0.0, 0.0, 0.0]) == (v.UNJUDGED, 1.0)
    assert v.t_test_p([2.0, 2.0, 2.0]) == 0.0  # identical non-zero gains: no spread


def test_t_test_matches_the_closed_form():
    diffs = [1.0, 2.0, 4.0]
    mean, sd, n = 7 / 3, (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) ** 0.5, 3
    from scipy.stats import t

    assert v.t_test_p(diffs) == pytest.approx(2 * t.sf(mean / (sd / n**0.5), n - 1))


def test_results_doc_from_hand_made_store(tmp_path):
    glue = [run("lora", s, 0.80 + 0.01 * s, erank=4.0) for s in range(3)]
    glue += [
        run("astra", s, 0.85 + 0.01 * s, losses=(0.9, 0.7, 0.6, 0.5), erank=6.0 + s / 10) for s in range(3)
    ]
    glue += [run("pissa", s, 0.90 + 0.012 * s) for s in range(3)]
    nlg = [run("lora", s, 0.02, task="metamath", forgetting=0.05 + 0.01 * s) for s in range(3)]
    nlg += [run("astra", s, 0.03, task="metamath", forgetting=0.20 + 0.011 * s) for s in range(3)]
    root = store(tmp_path / "results", {"mini_glue": glue, "mini_nlg": nlg})
    doc, section = v.render(root)
    rows = {line.split(" | ")[0].lstrip("| ") + " @" + line.split(" | ")[1]: line
            for line in doc.splitlines() if line.startswith("| ") and "`mini_" in line.split(" | ")[1]}  # fmt: skip
    beats_lora = rows["astra beats lora @`mini_glue`"]
    assert "| 3 | +5 ± 0 |" in beats_lora and f"**{v.HOLDS}**" in beats_lora  # +5 points on every seed
    assert f"**{v.FAILS}**" in rows["astra beats pissa @`mini_glue`"]  # pissa better by 5-5.4 points
    assert f"**{v.UNJUDGED}**" in rows["astra beats lora_ga @`mini_glue`"] and "| 0 | - |" in rows[
        "astra beats lora_ga @`mini_glue`"]  # no lora_ga run: no pair  # fmt: skip
    assert f"**{v.HOLDS}**" in rows["astra converges faster than lora @`mini_glue`"]
    assert f"**{v.HOLDS}**" in rows["astra's update has a higher effective rank than lora's @`mini_glue`"]
    forget = rows["astra forgets less than lora (beyond the paper) @`mini_nlg`"]
    assert f"**{v.FAILS}**" in forget and "-0.151 ± 0.001" in forget
    assert "| lora | 0.0600 ± 0.0100 | 3.0000 ± 0.0000 | 3.0600 ± 0.0100 | 3 |" in doc
    assert "| `mini_glue` | 9 / 0 | minilm | glue/sst2 | astra, lora, pissa | 0, 1, 2 | 2000 |" in doc
    assert "Total wall time: 15 min 00 s" in doc  # 15 runs x 60 s
    assert "not the paper's numbers" in doc and "MetaMathQA-derived" in doc
    assert "make sweep SWEEP=mini_glue" in doc and section.count("| astra beats lora |") == 2


def test_cli_writes_doc_and_replaces_only_the_readme_section(tmp_path):
    root = store(
        tmp_path / "results", {"mini_select": [run("astra", s, 0.8, select="tail") for s in range(3)]}
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\nintro\n{v.README_START}\nold numbers\n{v.README_END}\ntail text\n")
    out = tmp_path / "docs" / "results.md"
    v.main(["--results-dir", str(root), "--out", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(f"# T\nintro\n{v.README_START}\n") and text.endswith(
        f"{v.README_END}\ntail text\n"
    )
    assert "old numbers" not in text and "tail eigenvectors beat head" in text
    assert out.read_text().startswith("# Results (CPU scale)")
    with pytest.raises(ValueError):
        v.replace_section("no markers", "x")
