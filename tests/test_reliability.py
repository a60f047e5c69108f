"""Reliability (issue 11): no broken run recorded as a success, mistakes refused up front naming the field,
bad data named by file and line, a results store that verifies what it reads. docs/reliability.md lists
every case with the test that pins it."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from astra.guards import NonFiniteError, NonFiniteGuard, check_finite_metrics, check_finite_weights
from astra.pipeline import run_experiment
from astra.results import read_result
from astra.validate import ConfigValidationError, check_results_dir, unlabelled_examples
from tests.conftest import TINY_DATA_DIR

TINY = ["debug=tiny"]  # tiny-bert, glue/mrpc, 2 steps
TINY_LLAMA = ["debug=tiny_llama"]  # tiny-llama, metamath, 2 steps


def only_result(tmp_path: Path):
    (path,) = sorted((tmp_path / "results" / "runs").glob("*.json"))
    return read_result(path)


def failed_with(tmp_path: Path, pattern: str):
    result = only_result(tmp_path)
    assert result.run_info.status == "failed" and pattern in result.run_info.error, result.run_info.error[
        -800:
    ]
    return result


# --- 1. non-finite guards ------------------------------------------------------------------------------
def test_huge_lr_fails_at_the_first_non_finite_step_naming_the_layer(compose, tmp_path):
    with pytest.raises(
        NonFiniteError, match=r"non-finite gradient at optimisation step \d+: first layer '.*lora_"
    ):
        run_experiment(compose([*TINY, "method=lora", "trainer.lr=1e30", "trainer.max_steps=6"]))
    result = failed_with(tmp_path, "NonFiniteError")
    assert not result.eval_info.metrics  # never evaluated


def test_fp16_model_at_the_default_lr_fails_instead_of_recording_a_nan_success(compose, tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at optimisation step \d+: first layer"):
        run_experiment(compose([*TINY, "method=lora", "model.dtype=float16", "trainer.max_steps=4"]))
    assert not failed_with(tmp_path, "NonFiniteError").eval_info.metrics


def test_guard_names_step_and_first_layer_with_non_finite_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model(torch.ones(1, 3)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")

    class State:
        global_step = 6

    with pytest.raises(NonFiniteError, match=r"step 7: first layer '1'"):
        NonFiniteGuard().on_pre_optimizer_step(None, State(), None, model=model)
    model[1].weight.grad.zero_()
    NonFiniteGuard().on_pre_optimizer_step(None, State(), None, model=model)  # finite: passes
    with pytest.raises(NonFiniteError, match="loss"):
        NonFiniteGuard().on_log(None, State(), None, logs={"loss": float("inf")})


def test_evaluation_of_non_finite_weights_and_non_finite_metrics_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    check_finite_weights(model)
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'0.bias'"):
        check_finite_weights(model)
    check_finite_metrics({"accuracy": 0.5, "n_eval": 32})
    with pytest.raises(NonFiniteError, match="accuracy"):
        check_finite_metrics({"accuracy": float("nan"), "n_eval": 32})


def test_non_finite_step0_loss_fails_the_run(compose, tmp_path, monkeypatch):
    import astra.pipeline as pipeline

    monkeypatch.setattr(pipeline, "batch_loss", lambda model, batch: float("nan"))
    with pytest.raises(NonFiniteError, match="base-model loss"):
        run_experiment(compose([*TINY, "method=lora"]))
    assert failed_with(tmp_path, "before training").train_info.history == []


def test_astra_on_a_model_with_huge_weights_fails_naming_the_layer_and_caches_nothing(
    compose, tmp_path, monkeypatch
):
    import astra.pipeline as pipeline

    real_load = pipeline.load_model

    def poisoned(*args, **kwargs):
        model, tokenizer, model_id = real_load(*args, **kwargs)
        with torch.no_grad():
            layer = model.bert.encoder.layer[0].attention.self.query
            layer.weight[:3, :3] = (
                1e30  # a few huge weights: the loss stays finite (softmax saturates), y y^T overflows
            )
        return model, tokenizer, model_id + "-poisoned"

    monkeypatch.setattr(pipeline, "load_model", poisoned)
    cache = tmp_path / "cache"
    query = "bert.encoder.layer.0.attention.self.query"
    with pytest.raises(FloatingPointError, match=rf"non-finite statistics .* in layer '{query}'"):
        run_experiment(compose([*TINY, "method=astra", f"paths.cache_dir={cache}"]))
    assert failed_with(tmp_path, "NonFiniteStatisticsError").train_info.history == []
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing cached under a valid checksum


def test_non_finite_init_factors_fail_the_build_naming_the_layer(compose, tmp_path, monkeypatch):
    from astra.methods import LoraInit, get_method, load_methods

    load_methods()
    cls = type(get_method("pissa"))
    real_init = cls.init

    def nan_init(self, weight, stats, spec):
        init = real_init(self, weight, stats, spec)
        if spec.name.endswith("layer.1.attention.self.key"):
            init = LoraInit(A=init.A, B=torch.full_like(init.B, float("nan")), residual=init.residual)
        return init

    monkeypatch.setattr(cls, "init", nan_init)
    with pytest.raises(NonFiniteError, match=r"init of layer '.*layer\.1\.attention\.self\.key': factor B"):
        run_experiment(compose([*TINY, "method=pissa"]))
    failed_with(tmp_path, "NonFiniteError")


# --- 2. up-front validation ----------------------------------------------------------------------------
def test_target_module_typo_lists_layers_and_suggests_the_nearest(compose, tmp_path):
    with pytest.raises(ConfigValidationError) as err:
        run_experiment(compose([*TINY, "method=lora", "method.target_modules=[query,vlaue]"]))
    message = str(err.value)
    assert "'vlaue'" in message and "did you mean 'value'" in message and "query" in message
    assert "'query' matches" not in message  # only the bad pattern is reported
    assert failed_with(tmp_path, "vlaue").train_info.base_loss is None  # refused before any data was read


@pytest.mark.parametrize("method", ["lora", "pissa", "astra", "lora_ga"])
@pytest.mark.parametrize("rank", [0, -1, 100000])
def test_rank_out_of_range_is_named_method_rank_before_any_statistics(
    compose, tmp_path, method, rank, monkeypatch
):
    import astra.pipeline as pipeline

    monkeypatch.setattr(
        pipeline, "build_task", lambda *a, **k: pytest.fail("data read before the rank check")
    )
    with pytest.raises(ConfigValidationError, match=rf"method\.rank={rank} must lie in 1\.\.32"):
        run_experiment(compose([*TINY, f"method={method}", f"method.rank={rank}"]))


def test_unwritable_results_dir_and_results_path_that_is_a_file_fail_at_start(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigValidationError, match="is a file"):
        check_results_dir(a_file)
    with pytest.raises(ConfigValidationError, match="is a file"):
        check_results_dir(a_file / "results")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:  # root ignores permission bits: /proc refuses every new directory whoever asks
        target = Path("/proc/astra-results") if os.access(locked, os.W_OK) else locked / "results"
        with pytest.raises(ConfigValidationError, match="not writable"):
            check_results_dir(target)
    finally:
        locked.chmod(0o700)
    check_results_dir(tmp_path / "fresh" / "results")
    assert (tmp_path / "fresh" / "results").is_dir()


def test_results_path_that_is_a_file_fails_before_the_model_loads(compose, tmp_path, monkeypatch):
    import astra.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "results").write_text("not a directory")
    with pytest.raises(ConfigValidationError, match="results_dir"):
        run_experiment(compose(TINY))


def test_metamath_truncation_that_masks_every_label_fails(compose, tmp_path):
    with pytest.raises(
        ConfigValidationError, match=r"no label token left after truncation to task.max_length=64"
    ):
        run_experiment(compose([*TINY_LLAMA, "method=lora", "task.max_length=64"]))
    assert failed_with(tmp_path, "max_unlabelled_fraction").train_info.history == []


def test_unlabelled_examples_counts_only_examples_without_a_target():
    data = [{"labels": [-100, -100, 5]}, {"labels": [7, -100, -100]}, {"labels": [-100]}, {"labels": 1}]
    assert unlabelled_examples(data) == [1, 2]  # position 0 is never a target after the shift


def test_unknown_glue_task_lists_the_glue_tasks(compose):
    with pytest.raises(Exception) as err:
        compose(["task=glue/nope"])
    message = str(err.value)
    assert "glue/nope" in message and "glue/mrpc" in message and "glue/sst2" in message


# --- 3. data errors name the file and line -------------------------------------------------------------
@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(TINY_DATA_DIR / "glue" / "mrpc", root / "glue" / "mrpc")
    for name in ("gsm8k", "math", "math500", "codealpaca"):
        if (TINY_DATA_DIR / name).exists():
            shutil.copytree(TINY_DATA_DIR / name, root / name)
    for path in TINY_DATA_DIR.iterdir():  # metamath training files may live at the top level
        if path.is_file():
            shutil.copy(path, root / path.name)
    return root


def mrpc_lines(root: Path, split: str = "train") -> tuple[Path, list[str]]:
    path = root / "glue" / "mrpc" / f"{split}.tsv"
    return path, path.read_text(encoding="utf-8-sig").splitlines()


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda lines: [lines[0], *lines[1:3], lines[3].rsplit("\t", 1)[0], *lines[4:]],
            r":4: no value for column",
        ),
        (
            lambda lines: [lines[0], lines[1], "x\t" + lines[2].split("\t", 1)[1], *lines[3:]],
            r":3: column 'Quality'",
        ),
        (
            lambda lines: [lines[0], "7\t" + lines[1].split("\t", 1)[1], *lines[2:]],
            r":2: .*label '7' outside",
        ),
        (lambda lines: [], r"empty file"),
        (lambda lines: [lines[0]], r"only a header"),
    ],
    ids=["missing-column", "non-numeric-label", "label-out-of-range", "empty", "header-only"],
)
def test_bad_tsv_names_file_and_line(compose, data_copy, edit, pattern):
    path, lines = mrpc_lines(data_copy)
    path.write_text("\n".join(edit(lines)) + ("\n" if lines else ""), encoding="utf-8")
    from astra.data import DataFileError

    with pytest.raises(DataFileError, match=rf"{path}{'' if pattern.startswith(':') else '.*'}{pattern}"):
        run_experiment(compose([*TINY, "method=lora", f"paths.data_dir={data_copy}"]))


def test_corrupt_dev_file_is_found_before_training(compose, tmp_path, data_copy):
    path, lines = mrpc_lines(data_copy, "dev")
    path.write_text(lines[0] + "\n")
    from astra.data import DataFileError

    with pytest.raises(DataFileError, match="dev.tsv"):
        run_experiment(compose([*TINY, "method=lora", f"paths.data_dir={data_copy}"]))
    assert only_result(tmp_path).train_info.history == []  # no training step was spent


def test_truncated_jsonl_and_bad_gzip_name_file_and_line(tmp_path):
    from astra.data import DataFileError
    from astra.nlg import read_records

    lines = [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(6)]
    lines[4] = lines[4][:10]  # truncated line 5
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=rf"{jsonl}:5: invalid JSON line"):
        read_records(jsonl)
    packed = tmp_path / "test.jsonl.gz"
    packed.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataFileError, match=rf"{packed}:5:"):
        read_records(packed)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataFileError, match=rf"{broken}: cannot be read"):
        read_records(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFileError, match=rf"{empty}: empty file"):
        read_records(empty)


# --- 4. a store that verifies what it reads ------------------------------------------------------------
@pytest.fixture
def store_with_bad_files(compose, tmp_path):
    """A store with one good run and four bad files: metric as a string, config edited after the run,
    a truncated file, a result filed under another signature."""
    good = run_experiment(compose([*TINY, "method=lora"]))
    runs = tmp_path / "results" / "runs"
    path = runs / f"{good.run_info.signature}.json"
    data = json.loads(path.read_text())
    bad = {}
    edited = json.loads(json.dumps(data))
    edited["eval_info"]["metrics"]["accuracy"] = "0.9"
    bad["metric-string"] = edited
    edited = json.loads(json.dumps(data))
    edited["run_info"]["config"]["trainer"]["lr"] = 1.0
    bad["config-edited"] = edited
    for name, content in bad.items():
        (runs / f"{name}.json").write_text(json.dumps(content))
    (runs / "truncated.json").write_text(path.read_text()[:200])
    (runs / "000000000000.json").write_text(path.read_text())  # right content, wrong name
    return tmp_path / "results", path


def test_result_files_are_world_readable(store_with_bad_files):
    _, path = store_with_bad_files
    assert path.stat().st_mode & 0o777 == 0o644


def test_store_names_every_bad_file_and_keeps_the_good_one(store_with_bad_files):
    from astra.results import StoreError, load_runs, scan_runs

    results, good = store_with_bad_files
    runs, problems = scan_runs(results)
    assert [r.run_info.signature for r in runs] == [good.stem]
    text = "\n".join(problems)
    for name in ("metric-string", "config-edited", "truncated", "000000000000"):
        assert f"{name}.json" in text
    assert "is not a number" in text and "hashes to" in text and "not 000000000000" in text
    with pytest.raises(StoreError, match="truncated.json"):
        load_runs(results)


def test_tables_exit_non_zero_on_bad_files_unless_allowed(store_with_bad_files, tmp_path, capsys):
    from analysis.tables import main

    results, _ = store_with_bad_files
    with pytest.raises(SystemExit) as exit_:
        main(["--results-dir", str(results), "--out", str(tmp_path / "report")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "4 result file(s) could not be read" in err and "config-edited.json" in err
    main(["--results-dir", str(results), "--out", str(tmp_path / "report2"), "--allow-bad"])  # warns only
    assert "truncated.json" in capsys.readouterr().err
    assert (tmp_path / "report2" / "tables" / "index.md").exists()


def test_status_exit_code_on_unreadable_result_and_allow_bad(tmp_path, monkeypatch, capsys):
    import astra.sweeps as sweeps

    path = tmp_path / "runs" / "abcdefabcdef.json"
    path.parent.mkdir()
    path.write_text("{")
    run = sweeps.ExpectedRun(["method=lora"], "abcdefabcdef", path)
    run.state, run.detail = sweeps.run_state(tmp_path, "abcdefabcdef", 60.0)
    assert run.detail.startswith("unreadable") and "abcdefabcdef.json" in run.detail
    monkeypatch.setattr(sweeps, "expected_runs", lambda sweep, extra: [run])
    assert sweeps.status("mini_glue") == 1
    assert sweeps.status("mini_glue", allow_bad=True) == 0


# --- settings that must take effect --------------------------------------------------------------------
def test_eval_max_new_tokens_ignored_by_metamath_is_refused(compose, tmp_path, monkeypatch):
    import astra.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigValidationError, match=r"set task.max_new_tokens=16 instead"):
        run_experiment(compose([*TINY_LLAMA, "method=lora", "eval.max_new_tokens=16"]))


def test_task_max_new_tokens_reaches_generation(compose, monkeypatch):
    from astra.data import build_task
    from astra.models import load_model

    cfg = compose([*TINY_LLAMA, "method=lora", "task.max_new_tokens=3"])
    _, tokenizer, _ = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=0)
    assert build_task(cfg.task, tokenizer, cfg.paths.data_dir).max_new_tokens(cfg.eval) == 3


def test_hydra_logs_go_under_paths_output_dir(tmp_path):
    import subprocess
    import sys

    out, results = tmp_path / "out", tmp_path / "res"
    cmd = [sys.executable, "-m", "astra.run", *TINY, "method=lora", "trainer.max_steps=1",
           f"paths.output_dir={out}", f"paths.results_dir={results}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((out / "hydra").rglob(".hydra/config.yaml")), (
        "Hydra's run folder is not under paths.output_dir"
    )
    assert not (tmp_path / "outputs").exists()


def test_non_finite_eigenvalues_fail_naming_the_layer():
    from astra.eigen import decompose
    from astra.stats import LayerStats

    matrix = torch.eye(4)
    matrix[0, 0] = float("inf")  # a statistic that slipped past the engine's check
    stats = LayerStats(name="encoder.layer.0.query", kind="output_cov", matrix=matrix, tokens=8, samples=2)
    with pytest.raises(FloatingPointError, match=r"non-finite eigenvalues in layer 'encoder.layer.0.query'"):
        decompose(stats)
    assert decompose(LayerStats(name="ok", kind="output_cov", matrix=torch.eye(4), tokens=8, samples=2))
