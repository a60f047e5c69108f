"""Checkpoints and resume (astra/checkpoint.py): a run interrupted at step k and rerun resumes from its last
checkpoint and ends with the same losses as an uninterrupted run; the failed attempt keeps its history;
checkpoints are sealed, verified, and removed once the result is written."""

from __future__ import annotations

from pathlib import Path

import pytest

import astra.pipeline as pipeline
from astra.artifacts import MANIFEST
from astra.checkpoint import checkpoints, last_checkpoint
from astra.config import run_identity
from astra.results import read_result, run_path
from astra.trainer import HistoryCallback

# tiny BERT on MRPC, 6 steps, LoRA with dropout (the RNG state must be restored for an exact resume)
RUN = ["debug=tiny", "method=lora", "method.dropout=0.1", "trainer.max_steps=6", "trainer.save_every=2"]
KILL_AT = 5  # after the checkpoint of step 4


class Interrupted(RuntimeError):
    pass


def killing_history(at: int, live: list[int]):
    """A HistoryCallback that records the steps it saw logged live, and raises at step `at` (a crash)."""

    class Killing(HistoryCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            super().on_log(args, state, control, logs=logs, **kwargs)
            if logs and "loss" in logs:
                live.append(state.global_step)
                if state.global_step == at:
                    raise Interrupted(f"killed at step {at}")

    return Killing


def scratch(cfg) -> Path:  # noqa: ANN001
    return Path(pipeline.scratch_dir(cfg, run_identity(cfg)[2]))


def test_interrupted_run_resumes_from_checkpoint_with_the_same_losses(compose, tmp_path, monkeypatch, caplog):
    reference = pipeline.run_experiment(compose([*RUN, f"paths.results_dir={tmp_path / 'ref'}",
                                                 f"paths.output_dir={tmp_path / 'ref-out'}"]))  # fmt: skip
    cfg = compose(RUN)
    first: list[int] = []
    monkeypatch.setattr(pipeline, "HistoryCallback", killing_history(KILL_AT, first))
    with pytest.raises(Interrupted):
        pipeline.run_experiment(cfg)
    sig = run_identity(cfg)[2]
    failed = read_result(run_path(cfg.paths.results_dir, sig))
    assert failed.run_info.status == "failed" and "killed at step 5" in failed.run_info.error
    assert [r["step"] for r in failed.train_info.history] == [1, 2, 3, 4, 5]  # kept, not emptied
    assert [p.name for p in checkpoints(scratch(cfg))] == ["checkpoint-4", "checkpoint-2"]  # limit 2
    assert all((p / MANIFEST).is_file() for p in checkpoints(scratch(cfg)))  # sealed after saving

    second: list[int] = []
    monkeypatch.setattr(pipeline, "HistoryCallback", killing_history(-1, second))
    with caplog.at_level("WARNING", logger="astra.trainer"):
        resumed = pipeline.run_experiment(cfg)
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert second == [5, 6]  # only the steps after the checkpoint were trained again
    assert resumed.ok and [r["step"] for r in resumed.train_info.history] == [1, 2, 3, 4, 5, 6]
    # deterministic CPU run: the resumed losses equal the uninterrupted run's (tolerance 1e-6 relative)
    ref_losses = [r["loss"] for r in reference.train_info.history]
    assert [r["loss"] for r in resumed.train_info.history] == pytest.approx(ref_losses, rel=1e-6)
    assert resumed.eval_info.metrics == pytest.approx(reference.eval_info.metrics, rel=1e-6)
    assert checkpoints(scratch(cfg)) == []  # removed once the result is written


def test_checkpoints_kept_when_asked(compose):
    cfg = compose([*RUN, "trainer.keep_checkpoints=true"])
    assert pipeline.run_experiment(cfg).ok
    assert [p.name for p in checkpoints(scratch(cfg))] == ["checkpoint-6", "checkpoint-4"]


def test_save_every_and_keep_checkpoints_are_not_in_the_signature(compose):
    plain = run_identity(compose(["debug=tiny"]))[2]
    assert (
        run_identity(compose(["debug=tiny", "trainer.save_every=3", "trainer.keep_checkpoints=true"]))[2]
        == plain
    )


def test_unsealed_or_damaged_checkpoint_is_not_resumed(compose, tmp_path, caplog):
    cfg = compose([*RUN, "trainer.keep_checkpoints=true"])
    assert pipeline.run_experiment(cfg).ok
    out = scratch(cfg)
    (out / "checkpoint-6" / MANIFEST).unlink()  # a save cut short: the manifest is written last
    opt = out / "checkpoint-4" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-10])  # a damaged file
    with caplog.at_level("WARNING", logger="astra.checkpoint"):
        assert last_checkpoint(out) is None
    assert "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text
    assert checkpoints(out) == []  # both removed: a rerun starts from step 0


def test_run_log_holds_steps_status_and_traceback(compose, monkeypatch):
    cfg = compose(RUN)
    monkeypatch.setattr(pipeline, "HistoryCallback", killing_history(3, []))
    with pytest.raises(Interrupted):
        pipeline.run_experiment(cfg)
    failed = read_result(run_path(cfg.paths.results_dir, run_identity(cfg)[2]))
    text = Path(failed.run_info.log_file).read_text()
    assert Path(failed.run_info.log_file).parent == scratch(cfg)
    assert "step 1 loss=" in text and "step 3 loss=" in text and "step 4 loss=" not in text
    assert "status failed" in text and "Traceback" in text and "killed at step 3" in text
