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
    from astra.pipeline import load_registry

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


# --- composition order, debug group ---------------------------------------------------------------
def write_sweep(root: Path, body: str) -> str:
    """A sweep file in an extra config search path; returns the `hydra.searchpath` override."""
    (root / "sweep").mkdir(parents=True, exist_ok=True)
    (root / "sweep" / "seeded.yaml").write_text("# @package _global_\n" + body)
    return f"hydra.searchpath=[file://{root}]"


def test_sweep_file_sets_seed_and_device(compose, tmp_path):
    searchpath = write_sweep(tmp_path / "conf", "seed: 5\ndevice: cpu\nsweep:\n  name: seeded\n")
    cfg = compose([searchpath, "sweep=seeded"])
    assert cfg.seed == 5 and cfg.device == "cpu" and cfg.sweep.name == "seeded"
    assert compose([searchpath, "sweep=seeded", "seed=7"]).seed == 7  # the command line still wins


def test_debug_group_is_a_tiny_run_without_logger(compose):
    from astra.pipeline import compose_config

    assert compose_config(["logger=wandb", "debug=tiny"]).logger.name == "wandb"  # the command line wins
    assert compose_config(["debug=tiny"]).logger.name == "none"
    cfg = compose(["debug=tiny"])
    assert cfg.model.name == "tiny-bert"
    assert cfg.trainer.max_steps == 2 and cfg.eval.limit == 32 and cfg.calib.n == 8
    llama = compose(["debug=tiny_llama"])
    assert (
        llama.model.name == "tiny-llama" and llama.task.head == "causal_lm" and llama.trainer.max_steps == 2
    )
    demo = compose(["sweep=demo", "debug=tiny"])  # a sweep's task stays, only its scale shrinks
    assert demo.task.name == "glue/sst2" and demo.model.name == "tiny-bert" and demo.sweep.name == "demo"


# --- schema-owned choices and defaults ------------------------------------------------------------
@pytest.mark.parametrize(
    "override, valid",
    [
        ("calib.format=txt", "train_prompt, code_release, text"),
        ("calib.padding=long", "longest, max_length"),
        ("trainer.scheduler=cosin", "linear, cosine"),
        ("trainer.optim=adamw", "adamw_torch"),
        ("logger.mode=onlin", "offline, online, disabled"),
        ("device=gpu", "auto, cpu, cuda"),
        ("task.head=classifier", "seq_cls, causal_lm"),
        ("model.dtype=fp32", "float32, bfloat16, float16"),
        ("sweep.if_claimed=run", "skip, wait"),
    ],
)
def test_bad_choice_fails_at_compose_time_naming_valid_values(compose, override, valid):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    assert valid in str(err.value.__cause__)


def test_choice_lists_match_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from astra.config import Optimizer, Scheduler

    assert {m.value for m in Scheduler} == {m.value for m in SchedulerType}
    assert {m.value for m in Optimizer} == {m.value for m in OptimizerNames}
    assert all(m.name == m.value for m in [*Scheduler, *Optimizer])


SCHEMA_OF_GROUP = {"calib": "CalibConfig", "trainer": "TrainerConfig", "eval": "EvalConfig",
                   "logger": "LoggerConfig", "paths": "PathsConfig"}  # fmt: skip


@pytest.mark.parametrize("path", sorted(p for g in SCHEMA_OF_GROUP for p in (CONF / g).glob("*.yaml")))
def test_group_yaml_holds_only_diffs_from_the_schema(path):
    """A value equal to the dataclass default is a duplicate that can silently drift from it."""
    import yaml

    from astra import config

    schema = getattr(config, SCHEMA_OF_GROUP[path.parent.name])()
    values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
    same = [k for k, v in values.items() if getattr(schema, k) == v]
    assert not same, f"{path.name} repeats schema defaults: {same}"


def test_task_yamls_repeat_no_schema_default():
    import yaml

    from astra import config

    for path in sorted((CONF / "task").rglob("*.yaml")):
        schema = config.GlueTaskConfig() if path.parent.name == "glue" else config.NLGTaskConfig
        values = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
        defaults = {f.name: f.default for f in __import__("dataclasses").fields(schema)}
        same = [k for k, v in values.items() if defaults.get(k) == v]
        assert not same, f"{path} repeats schema defaults: {same}"


def test_every_task_declares_head_and_metrics(compose):
    for path in sorted((CONF / "task").rglob("*.yaml")):
        name = str(path.relative_to(CONF / "task").with_suffix(""))
        task = compose([f"task={name}"]).task
        assert task.head in ("seq_cls", "causal_lm") and task.metrics and task.main_metric, name
        assert (task.head == "seq_cls") == (task.family == "glue"), name
