"""Results store: run identity, typed and verified results, views, claims, schema-1 migration."""

from __future__ import annotations

import enum
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from astra import results
from astra.config import run_identity
from astra.results import (
    RunInfo,
    RunResult,
    StoreError,
    finished,
    load_runs,
    read_result,
    run_path,
    signature_of,
    sweep_signatures,
    try_claim,
    write_atomic,
    write_result,
)

TINY = ["model=tiny-bert"]


def sig(cfg) -> str:
    return run_identity(cfg)[2]


# --- run identity ---------------------------------------------------------------------------------
def test_signature_is_stable_and_ignores_fields_that_cannot_change_a_result(compose):
    base = compose(TINY)
    assert sig(base) == sig(compose(TINY))
    same = compose([*TINY, "logger=wandb", "paths.output_dir=/elsewhere", "sweep.name=other", "device=cpu",
                    "trainer.dataloader_num_workers=4", "trainer.save_model=true", "eval.workers=7",
                    "trainer.rank_probe_steps=[0,5]", "trainer.rank_probe_samples=3", "model.num_params=1M",
                    "sweep.claim_timeout_s=5"])  # fmt: skip
    assert sig(same) == sig(base)


@pytest.mark.parametrize(
    "change", ["seed=1", "method=full_ft", "trainer.lr=1e-3", "task=glue/rte", "method.rank=4", "calib.n=8",
               "trainer.scheduler=linear", "eval.limit=3", "model.dtype=bfloat16"],
)  # fmt: skip
def test_signature_changes_with_every_result_field(compose, change):
    assert sig(compose([*TINY, change])) != sig(compose(TINY))


def test_unsigned_paths_come_from_schema_marks(compose):
    _, unsigned, _ = run_identity(compose(TINY))
    assert {"logger", "paths", "sweep", "device", "eval.workers", "trainer.save_model", "model.num_params",
            "trainer.rank_probe_steps", "trainer.dataloader_num_workers"} <= set(unsigned)  # fmt: skip
    assert not {"seed", "trainer.lr", "method.rank", "eval.limit"} & set(unsigned)


def other_value(value):
    """A different valid value of a schema field: negated bool, next int, another enum member."""
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, enum.Enum):
        return next(m.value for m in type(value) if m != value)
    if isinstance(value, int) or value is None:
        return (value or 0) + 1
    raise AssertionError(f"no alternative for {value!r}")


def test_method_cache_and_stats_switches_are_not_in_the_signature(compose):
    """Owners of the method schemas mark their exact switches; every mark must reach the signature."""
    from astra import config
    from astra.methods import get_method, registered_methods

    compose(TINY)  # loads the registry
    checked = []
    for name in registered_methods():
        base = compose([*TINY, f"method={name}"])
        for field in sorted(config.unsigned_fields(type(get_method(name)).schema)):
            flipped = compose([*TINY, f"method={name}", f"method.{field}={other_value(base.method[field])}"])
            assert flipped.method[field] != base.method[field]
            assert sig(flipped) == sig(base), f"{name}.{field}"
            checked.append(f"{name}.{field}")
    assert {"astra.cache", "astra.stats_engine"} <= set(checked), checked


def test_signature_independent_of_key_order():
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert signature_of(a, []) == signature_of(b, [])
    assert signature_of(a, []) != signature_of({**a, "x": 2}, [])
    assert signature_of(a, ["x"]) == signature_of({**a, "x": 2}, ["x"])


# --- typed, verified results ----------------------------------------------------------------------
def make_result(status: str = "success", config: dict | None = None, sweep: str = "s") -> RunResult:
    config = config or {"seed": 0, "logger": {"name": "none"}}
    unsigned = ["logger"]
    return RunResult(run_info=RunInfo(signature=signature_of(config, unsigned), sweep=sweep, status=status,
                                      config=config, unsigned=unsigned))  # fmt: skip


def test_round_trip_and_validation(tmp_path):
    result = make_result()
    path = run_path(tmp_path, result.run_info.signature)
    write_result(path, result)
    assert read_result(path) == result and result.schema_version == 2
    assert path.stat().st_mode & 0o777 == 0o644
    data = json.loads(path.read_text())
    assert set(data) == {"run_info", "train_info", "eval_info", "meta_info", "schema_version"}
    data["train_info"]["surprise"] = 1
    with pytest.raises(ValueError, match="train_info"):
        RunResult.from_dict(data)
    with pytest.raises(ValueError, match="status"):
        RunResult.from_dict({"run_info": {**data["run_info"], "status": "maybe"}})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["eval_info"]["metrics"].update(accuracy="0.9"), "not a number"),
        (lambda d: d["eval_info"]["metrics"].update(accuracy=float("nan")), "successful run"),
        (lambda d: d["run_info"]["config"].update(seed=3), "hashes to"),  # config edited after the run
    ],
)
def test_read_refuses_untrustworthy_files_naming_them(tmp_path, edit, message):
    result = make_result()
    path = run_path(tmp_path, result.run_info.signature)
    data = result.to_dict()
    edit(data)
    write_atomic(path, data)
    with pytest.raises(StoreError, match=message) as err:
        read_result(path)
    assert str(path) in str(err.value)
    assert not finished(path)


def test_file_name_must_be_the_signature(tmp_path):
    result = make_result()
    path = run_path(tmp_path, "0" * 12)
    write_result(path, result)
    with pytest.raises(StoreError, match="holds run"):
        read_result(path)


def test_load_runs_reports_every_bad_file_or_skips_them(tmp_path, capsys):
    good = make_result()
    write_result(run_path(tmp_path, good.run_info.signature), good)
    (tmp_path / "runs" / "badbadbadbad.json").write_text('{"run_info": {"signa')
    with pytest.raises(StoreError, match="badbadbadbad.json"):
        load_runs(tmp_path)
    assert load_runs(tmp_path, strict=False) == [good]
    assert "badbadbadbad.json" in capsys.readouterr().err


def test_views_select_runs_of_a_sweep(tmp_path):
    a, b = make_result(config={"seed": 0}), make_result(config={"seed": 1})
    for r in (a, b):
        write_result(run_path(tmp_path, r.run_info.signature), r)
    results.mark_view(tmp_path, "s1", a.run_info.signature)
    results.mark_view(tmp_path, "s2", a.run_info.signature)
    results.mark_view(tmp_path, "s2", b.run_info.signature)
    assert sweep_signatures(tmp_path, "s1") == {a.run_info.signature}
    assert [r.run_info.signature for r in load_runs(tmp_path, "s1")] == [a.run_info.signature]
    assert len(load_runs(tmp_path, "s2")) == 2 and results.sweep_names(tmp_path) == ["s1", "s2"]


def test_finished_only_for_readable_successes(tmp_path):
    ok, failed = make_result(), make_result("failed", {"seed": 1})
    for r in (ok, failed):
        write_result(run_path(tmp_path, r.run_info.signature), r)
    broken = tmp_path / "runs" / "broken.json"
    broken.write_text('{"run_info": {"signa')  # a torn write from a crashed non-atomic writer
    assert finished(run_path(tmp_path, ok.run_info.signature))
    assert not finished(run_path(tmp_path, failed.run_info.signature)) and not finished(broken)
    assert not finished(tmp_path / "absent.json")


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_atomic(path, {"v": 1})

    def torn_dump(obj, f, **kwargs):
        f.write('{"v": 2, "half')  # part of the new content reaches the temp file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(results.json, "dump", torn_dump)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


# --- metric specs ---------------------------------------------------------------------------------
def test_metric_specs_by_name_or_pattern_with_default_direction():
    from astra.config import MetricSpec
    from astra.results import MetricKind, metric_specs

    declared = [MetricSpec("accuracy"), MetricSpec("*/n", MetricKind.count), MetricSpec("loss", MetricKind.loss),
                MetricSpec("matthews", MetricKind.score, higher_is_better=True)]  # fmt: skip
    specs = metric_specs({"accuracy": 0.5, "gsm8k/n": 3, "loss": 1.0, "matthews": 0.1}, declared)
    assert specs == {
        "accuracy": {"kind": "fraction", "higher_is_better": True},
        "gsm8k/n": {"kind": "count", "higher_is_better": True},
        "loss": {"kind": "loss", "higher_is_better": False},
        "matthews": {"kind": "score", "higher_is_better": True},
    }
    with pytest.raises(ValueError, match="throughput"):
        metric_specs({"throughput": 3.0}, declared)


# --- claims ---------------------------------------------------------------------------------------
def test_claim_is_exclusive_and_released(tmp_path):
    first = try_claim(tmp_path, "abc", timeout_s=3600)
    assert isinstance(first, results.Claim)
    assert set(json.loads(first.path.read_text())) >= {"host", "pid", "started_at"}
    second = try_claim(tmp_path, "abc", timeout_s=3600)
    assert second["pid"] == os.getpid() and not isinstance(second, results.Claim)
    first.release()
    assert not first.path.exists()
    assert isinstance(try_claim(tmp_path, "abc", timeout_s=3600), results.Claim)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process (nor a zombie)
    return proc.pid


def write_claim(tmp_path: Path, host: str, pid: int, started_at: str) -> Path:
    path = results.claim_path(tmp_path, "abc")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started_at": started_at, "token": "t"}))
    return path


def test_stale_claims_are_taken_over_live_ones_are_not(tmp_path):
    host = socket.gethostname()
    write_claim(tmp_path, host, dead_pid(), results.now_iso())  # a killed run on this host
    assert isinstance(try_claim(tmp_path, "abc", timeout_s=3600), results.Claim)
    write_claim(tmp_path, "other-host", 1, "2020-01-01T00:00:00+00:00")  # older than the timeout
    assert isinstance(try_claim(tmp_path, "abc", timeout_s=3600), results.Claim)
    path = write_claim(tmp_path, "other-host", 1, results.now_iso())  # alive for all we know
    assert try_claim(tmp_path, "abc", timeout_s=3600)["host"] == "other-host"
    write_claim(tmp_path, host, os.getpid(), results.now_iso())  # alive on this host
    assert not isinstance(try_claim(tmp_path, "abc", timeout_s=3600), results.Claim)
    assert path.exists()
    reused = json.loads(path.read_text()) | {"pid_start": "1"}  # our pid, but a process started at boot
    path.write_text(json.dumps(reused))
    assert isinstance(try_claim(tmp_path, "abc", timeout_s=3600), results.Claim)
    own = json.loads(path.read_text())
    assert own["pid"] == os.getpid() and own["pid_start"] == results.process_start(os.getpid()) != ""


def test_release_never_removes_a_claim_that_is_no_longer_ours(tmp_path):
    mine = try_claim(tmp_path, "abc", timeout_s=3600)
    write_claim(tmp_path, "other-host", 1, results.now_iso())  # taken over after we went stale
    mine.release()
    assert json.loads(mine.path.read_text())["host"] == "other-host"


def race(args: tuple[str, int]) -> bool:
    root, _ = args
    return isinstance(try_claim(root, "abc", timeout_s=3600), results.Claim)


def test_concurrent_claims_have_exactly_one_winner(tmp_path):
    host = socket.gethostname()
    write_claim(tmp_path, host, dead_pid(), results.now_iso())  # and they all race to take a stale one over
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        won = pool.map(race, [(str(tmp_path), i) for i in range(8)])
    # winners hold their claim until their process exits; a pool worker that won keeps the file
    assert sum(won) == 1, won


# --- migration of schema-1 stores -----------------------------------------------------------------
def legacy_file(results_dir: Path, sweep: str, cfg, status: str = "success") -> Path:
    """A result as schema 1 wrote it: `<sweep>/<old signature>.json`, no `unsigned`, version 1."""
    config = cfg if isinstance(cfg, dict) else run_identity(cfg)[0]
    data = make_result(status, config).to_dict()
    data["schema_version"] = 1
    data["run_info"].pop("unsigned")
    data["run_info"]["signature"] = f"old{len(list(results_dir.rglob('*.json'))):09d}"
    data["run_info"]["sweep"] = sweep
    path = results_dir / sweep / f"{data['run_info']['signature']}.json"
    write_atomic(path, data)
    return path


def test_migration_moves_schema_1_files_into_runs_and_views(compose, tmp_path):
    from astra.pipeline import migrate_store

    store = tmp_path / "results"
    cfg, other = compose([*TINY, "method.rank=4"]), compose([*TINY, "seed=1"])
    # one run computed by two sweeps, and a failed copy of it: one result, the success, two views
    legacy_file(store, "glue_table1", cfg)
    legacy_file(store, "ablation_rank", cfg)
    legacy_file(store, "ablation_rank", cfg, status="failed")
    legacy_file(store, "ablation_rank", other, status="failed")
    assert migrate_store(store) == 4
    assert sorted(p.name for p in (store / "runs").iterdir()) == sorted(
        f"{sig(c)}.json" for c in (cfg, other)
    )
    migrated = read_result(run_path(store, sig(cfg)))  # verified against today's signature
    assert migrated.ok and migrated.schema_version == 2 and "paths" in migrated.run_info.unsigned
    assert sweep_signatures(store, "glue_table1") == {sig(cfg)}
    assert sweep_signatures(store, "ablation_rank") == {sig(cfg), sig(other)}
    assert len(list((store / "legacy").rglob("*.json"))) == 4
    assert not list(store.glob("glue_table1/*.json")) and not list(store.glob("ablation_rank/*.json"))
    assert migrate_store(store) == 0  # idempotent


# --- sweep status (astra.sweeps, pipeline side) ---------------------------------------------------
def test_sweep_status_from_the_store(compose, tmp_path):
    from astra import sweeps

    store = tmp_path / "results"
    extra = [f"paths.results_dir={store}"]
    runs = sweeps.expected_runs("demo_select", extra)
    assert len(runs) == 8 and {r.state for r in runs} == {"missing"}  # select x seed = 4 x 2
    cfg = compose(["sweep=demo_select", "method=astra", "method.select=head", "seed=1", *extra])
    config, unsigned, signature = run_identity(cfg)
    assert signature in {r.signature for r in runs}
    done = RunResult(run_info=RunInfo(signature=signature, sweep="demo_select", status="success", config=config,
                                      unsigned=unsigned))  # fmt: skip
    write_result(run_path(store, signature), done)
    other = next(r for r in runs if r.signature != signature)
    claim = try_claim(store, other.signature, timeout_s=3600)  # a live run elsewhere
    results.mark_view(store, "demo_select", "f" * 12)  # from an older version of the sweep file
    states = {r.signature: r.state for r in sweeps.expected_runs("demo_select", extra)}
    assert states[signature] == "present" and states[other.signature] == "running"
    assert list(states.values()).count("missing") == 6
    claim.release()
    proc = subprocess.run([sys.executable, "-m", "astra.sweeps", "status", "demo_select", *extra],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 runs expected; 1 present, 0 failed, 0 running, 7 missing, 0 invalid" in proc.stdout
    assert "f" * 12 in proc.stdout  # the view's unexpected marker is reported
    write_atomic(run_path(store, signature), {**done.to_dict(), "eval_info": {"metrics": {"acc": "high"}}})
    assert sweeps.status("demo_select", extra) == 1  # an unreadable result fails `make status`


def test_migration_upgrades_configs_written_by_schema_1(compose, tmp_path):
    """Configs as commit ab8b91e composed them (tests/schema1_configs.json): no task.head, task.metrics as
    names, method.stats_grouping since removed. A run whose model is unchanged is found done today; the
    tiny random models now borrow another tokenizer, so an untouched old tiny config is another run."""
    import copy

    from astra.pipeline import migrate_store, run_experiment

    old = json.loads((Path(__file__).parent / "schema1_configs.json").read_text())
    store = tmp_path / "results"
    today = {
        "lora": compose(["model=tiny-bert", "task=glue/mrpc", "method=lora", "trainer.max_steps=2"]),
        "astra": compose(["model=tiny-bert", "task=glue/cola", "method=astra"]),
        "math": compose(["model=tiny-llama", "task=metamath", "method=pissa"]),
    }
    for name in ("lora", "astra"):  # the same model as today's: only the schemas changed
        config = copy.deepcopy(old[name])
        config["model"]["tokenizer_from"] = today[name].model.tokenizer_from
        legacy_file(store, "glue_table1", config)
    legacy_file(store, "nlg_math_code", old["math"])
    assert "head" not in old["lora"]["task"] and old["lora"]["task"]["metrics"] == ["accuracy", "f1"]
    assert migrate_store(store) == 3
    for name in ("lora", "astra"):
        assert finished(run_path(store, sig(today[name]))), name
    assert not finished(run_path(store, sig(today["math"])))
    assert len(list((store / "runs").glob("*.json"))) == 3
    migrated = read_result(run_path(store, sig(today["astra"]))).run_info.config
    assert "stats_grouping" not in migrated["method"] and migrated["task"]["head"] == "seq_cls"
    cfg = compose(["model=tiny-bert", "task=glue/mrpc", "method=lora", "trainer.max_steps=2",
                   f"paths.results_dir={store}", "sweep.name=glue_table1"])  # fmt: skip
    assert run_experiment(cfg) is None  # the migrated run is done: nothing is recomputed


def test_schema_1_file_read_directly_asks_for_migration(tmp_path):
    data = make_result().to_dict()
    data["schema_version"] = 1
    path = run_path(tmp_path, data["run_info"]["signature"])
    write_atomic(path, data)
    with pytest.raises(StoreError, match="astra.sweeps migrate"):
        read_result(path)


def test_git_dirty_ignores_the_committed_results_store(tmp_path, monkeypatch):
    """A sweep rewriting its tracked results must not mark the code that produced them as modified."""
    import astra.pipeline as pipeline

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "runs").mkdir(parents=True)
    (tmp_path / "results" / "runs" / "abc.json").write_text("{}")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(pipeline, "REPO_ROOT", tmp_path)
    (tmp_path / "results" / "runs" / "abc.json").write_text('{"status": "success"}')
    assert pipeline.git_state(tmp_path / "results")[1] is False
    assert pipeline.git_state(None)[1] is True  # without the store's path every change counts
    (tmp_path / "code.py").write_text("x = 2\n")
    assert pipeline.git_state(tmp_path / "results")[1] is True
