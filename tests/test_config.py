"""Config tree: every file composes, bad keys/types/options fail early with helpful messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from astra.methods import registered_methods

CONF = Path(__file__).resolve().parent.parent / "conf"


def group_options() -> list[str]:
    """`group=option` for every YAML under conf/ except the root config."""
    overrides = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF).with_suffix("")
        if rel.parent == Path("."):
            continue
        group, option = str(rel.parent), rel.name
        if group.startswith("task/"):  # nested option: task=glue/mrpc
            group, option = "task", f"{rel.parent.name}/{rel.name}"
        overrides.append(f"{group}={option}")
    return overrides


def test_conf_tree_is_walked():
    options = group_options()
    assert len(options) > 20
    assert {"method=lora", "task=glue/mrpc", "model=tiny-bert", "sweep=demo"} <= set(options)


@pytest.mark.parametrize("override", group_options())
def test_every_config_file_composes(compose, override):
    cfg = compose([override])
    assert cfg.model.name and cfg.task.name and cfg.method.name
    group, option = override.split("=")
    if group in ("model", "task", "method"):
        assert cfg[group].name == option


def test_registry_matches_method_configs():
    from astra.run import load_registry

    load_registry()
    assert set(registered_methods()) == {p.stem for p in (CONF / "method").glob("*.yaml")}


@pytest.mark.parametrize(
    "override, error",
    [
        ("trainer.lrr=1e-4", ConfigKeyError),  # misspelt key
        ("trainer.lr=fast", ValidationError),  # wrong type
        ("method.rank=eight", ValidationError),
        ("method.nonsense=1", ConfigKeyError),  # methods are typed by their own schema
        ("task.max_lenght=64", ConfigKeyError),
    ],
)
def test_bad_values_fail_at_compose_time(compose, override, error):
    with pytest.raises((ConfigCompositionException, error)):
        compose([override])


def test_unknown_option_exits_nonzero_naming_valid_options():
    proc = subprocess.run(
        [sys.executable, "-m", "astra.run", "method=nope", "logger=none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Could not find 'method/nope'" in proc.stderr
    assert "Available options in 'method'" in proc.stderr and "lora" in proc.stderr
