"""Results store: signature stability, schema validation, atomic writes."""

from __future__ import annotations

import json

import pytest

from astra import results
from astra.results import RunInfo, RunResult, finished, read_result, signature, write_atomic, write_result


def test_signature_is_stable_and_ignores_non_result_fields(compose):
    base = compose(["model=tiny-bert"])
    assert signature(base) == signature(compose(["model=tiny-bert"]))
    same = compose(["model=tiny-bert", "logger=wandb", "paths.output_dir=/elsewhere", "sweep.name=other",
                    "trainer.dataloader_num_workers=4", "device=cpu"])  # fmt: skip
    assert signature(same) == signature(base)


@pytest.mark.parametrize(
    "change", ["seed=1", "method=full_ft", "trainer.lr=1e-3", "task=glue/rte", "method.rank=4"]
)
def test_signature_changes_with_every_result_field(compose, change):
    assert signature(compose(["model=tiny-bert", change])) != signature(compose(["model=tiny-bert"]))


def test_signature_independent_of_key_order():
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert signature(a) == signature(b)
    assert signature(a) != signature({**a, "x": 2})


def make_result(status: str = "success") -> RunResult:
    return RunResult(run_info=RunInfo(signature="abc", sweep="s", status=status, config={"seed": 0}))


def test_round_trip_and_validation(tmp_path):
    path = tmp_path / "s" / "abc.json"
    write_result(path, make_result())
    assert read_result(path) == make_result()
    data = json.loads(path.read_text())
    assert set(data) == {"run_info", "train_info", "eval_info", "meta_info", "schema_version"}
    data["train_info"]["surprise"] = 1
    with pytest.raises(ValueError, match="train_info"):
        RunResult.from_dict(data)
    with pytest.raises(ValueError, match="status"):
        RunResult.from_dict({"run_info": {**data["run_info"], "status": "maybe"}})


def test_finished_only_for_readable_successes(tmp_path):
    ok, failed, broken = tmp_path / "ok.json", tmp_path / "failed.json", tmp_path / "broken.json"
    write_result(ok, make_result())
    write_result(failed, make_result("failed"))
    broken.write_text('{"run_info": {"signa')  # a torn write from a crashed non-atomic writer
    assert finished(ok) and not finished(failed) and not finished(broken)
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
