"""Experiment tracking: wandb (offline by default) as a view of the results JSON, or nothing."""

from __future__ import annotations

import os
from typing import Any


class NullTracker:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    """One wandb run per experiment run: group = sweep name, name = signature, config = resolved config."""

    def __init__(self, cfg: Any, sig: str, config: dict[str, Any], run_dir: str):
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=str(cfg.logger.mode),
            group=cfg.sweep.name,
            name=sig,
            id=f"{cfg.sweep.name}-{sig}"[:128],
            config=config,
            tags=list(cfg.logger.tags),
            dir=run_dir,
            resume="allow",
            reinit="finish_previous",
        )

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        self.run.log(
            {k: v for k, v in row.items() if k != "step"}, step=int(step) if step is not None else None
        )

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: Any, sig: str, config: dict[str, Any], run_dir: str) -> NullTracker:
    """`logger.name` is a schema choice (astra.config.LoggerName), checked at compose time."""
    return WandbTracker(cfg, sig, config, run_dir) if cfg.logger.name == "wandb" else NullTracker()
