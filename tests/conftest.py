"""Test set-up: offline Hub, the staged data dir, and per-test results/cache folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("ASTRA_DATA_DIR", str(REPO.parent / "shared" / "data"))
torch.set_num_threads(min(2, torch.get_num_threads()))

DATA_DIR = Path(os.environ["ASTRA_DATA_DIR"])
requires_data = pytest.mark.skipif(not DATA_DIR.exists(), reason=f"benchmark data not found at {DATA_DIR}")


@pytest.fixture
def run_overrides(tmp_path: Path) -> list[str]:
    """Overrides that keep a test's results and scratch files inside its tmp folder."""
    return [
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "logger=none",
    ]


@pytest.fixture
def compose(run_overrides: list[str]):
    """compose(["model=tiny-bert", ...]) -> the run config, isolated to the test's tmp folder."""
    from astra.run import compose_config

    return lambda overrides=(): compose_config(run_overrides + list(overrides))
