"""Checkpoints and resume of a run, on `transformers.Trainer`'s own checkpoint machinery.

`trainer.save_every=N` makes the Trainer write `checkpoint-<step>/` (trainable weights, optimizer,
scheduler, RNG states, `trainer_state.json` with the log history) into the run's scratch folder every N
steps. The Trainer writes those files in place, so a process killed while saving leaves a half-written
folder: `CheckpointSealer` seals each finished checkpoint with a manifest (astra.artifacts) written last,
and only a sealed, verified checkpoint is ever resumed from. A rerun of the same signature (same scratch
folder) resumes from the last such checkpoint; the rows of the per-step history logged before the
checkpoint are restored from its trainer state, so the result's history is the full run's.
The Trainer keeps the two newest checkpoints (`save_total_limit=2`): when the newest was cut short, the
previous one is still sealed.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from astra.artifacts import discard, problem, seal

log = logging.getLogger("astra.checkpoint")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_arguments(cfg: Any) -> dict[str, Any]:
    """TrainingArguments keywords for `trainer.save_every` (0: no checkpoints)."""
    every = int(cfg.trainer.get("save_every", 0) or 0)
    if every <= 0:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 2}


class CheckpointSealer(TrainerCallback):
    """Seals `checkpoint-<step>` once the Trainer has written all of it (on_save runs after the save)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 (transformers API)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                seal(folder, required=("trainer_state.json",))


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders under `output_dir`, newest (highest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest verified checkpoint; newer ones that fail verification are removed with a warning."""
    for folder in checkpoints(output_dir):
        why = problem(folder, required=("trainer_state.json",))
        if why is None:
            return folder
        log.warning("checkpoint %s is unusable (%s): removed, trying an older one", folder, why)
        discard(folder)
    return None


def remove_checkpoints(output_dir: str | Path) -> int:
    """Delete every checkpoint folder under `output_dir` (after the result is written); the number."""
    found = checkpoints(output_dir)
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    return len(found)


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The per-step rows HistoryCallback records, from a trainer state's log history."""
    rows = []
    for logs in log_history:
        if "loss" not in logs or "step" not in logs:
            continue
        row = {"step": logs["step"], "loss": float(logs["loss"])}
        for src, dst in (("grad_norm", "grad_norm"), ("learning_rate", "lr")):
            if src in logs:
                row[dst] = float(logs[src])
        rows.append(row)
    return rows


class ResumeHistory(TrainerCallback):
    """On a resumed run, puts the history rows logged before the checkpoint back in front of `history`."""

    def __init__(self, history: list[dict[str, float]]):
        self.history = history

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (transformers API)
        if state.global_step > 0:  # the Trainer loaded the checkpoint's state before this event
            restored = [r for r in history_rows(state.log_history) if r["step"] <= state.global_step]
            self.history[:] = restored + [r for r in self.history if r["step"] > state.global_step]
