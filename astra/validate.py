"""Up-front validation: mistakes that would waste a run are refused before training (most before any
model is loaded or data read), with a message naming the config field and what would be valid.

- `check_results_dir`: the results folder is a writable directory (probe write), checked at start.
- `check_adapter_targets`: every target-module pattern matches a linear layer of the loaded model (the
  layers that exist are listed, the nearest name suggested for a typo) and `method.rank` lies in
  1..min(d_out, d_in) for every target layer (and every `method.rank_pattern` value).
- `check_task_data`: every split the run will use is read and validated (file and line on errors),
  labels lie in the task's label set, and the training examples that lose every label token to
  truncation are counted; more than `task.max_unlabelled_fraction` of them fails the run.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger("astra")
IGNORE_INDEX = -100


class ConfigValidationError(ValueError):
    """A run config that cannot produce a valid result; the message names the field."""


# --- results store -----------------------------------------------------------------------------------
def check_results_dir(results_dir: str | Path) -> None:
    """Raise unless `results_dir` is (or can be created as) a directory this process can write into."""
    root = Path(results_dir)
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigValidationError(f"paths.results_dir={str(root)!r}: {blocker} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigValidationError(
            f"paths.results_dir={str(root)!r} is not writable ({type(err).__name__}: {err.strerror or err}); "
            "no run can record its result there"
        ) from err


# --- adapter targets and rank ------------------------------------------------------------------------
def nearest(name: str, candidates: list[str]) -> str:
    """' (did you mean 'value'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def target_patterns(cfg: Any) -> list[str]:
    return list(cfg.method.target_modules or cfg.model.target_modules or [])


def matched_linears(model: nn.Module, patterns: list[str]) -> dict[str, dict[str, nn.Linear]]:
    """{pattern: {name: linear}} by PEFT's matching rule (exact name or `.<pattern>` suffix, or a regex)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {}
    for pattern in patterns:
        config = LoraConfig(target_modules={pattern})
        found[pattern] = {n: m for n, m in linears.items() if check_target_module_exists(config, n)}
    return found


def check_adapter_targets(model: nn.Module, cfg: Any) -> None:
    """Every target pattern matches a linear layer; `method.rank` (and rank_pattern values) within
    1..min(d_out, d_in) of every target. Raises ConfigValidationError naming the field."""
    patterns = target_patterns(cfg)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = matched_linears(model, patterns)
    suffixes = sorted(
        {n.rsplit(".", 1)[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears}
    )
    unmatched = [p for p, hits in found.items() if not hits]
    if unmatched:
        lines = [f"  {p!r} matches no linear layer{nearest(p, suffixes)}" for p in unmatched]
        raise ConfigValidationError(
            "method.target_modules: \n" + "\n".join(lines) + f"\n  linear layer names end in: {suffixes}"
        )
    layers = {n: m for hits in found.values() for n, m in hits.items()}
    limit = min(min(m.out_features, m.in_features) for m in layers.values())
    ranks = {"method.rank": int(cfg.method.rank)}
    ranks |= {
        f"method.rank_pattern[{k!r}]": int(v) for k, v in (cfg.method.get("rank_pattern") or {}).items()
    }
    for field_name, rank in ranks.items():
        if not 1 <= rank <= limit:
            smallest = min(layers, key=lambda n: min(layers[n].out_features, layers[n].in_features))
            raise ConfigValidationError(
                f"{field_name}={rank} must lie in 1..{limit}: min(d_out, d_in) of the smallest target layer "
                f"({smallest}: {layers[smallest].out_features} x {layers[smallest].in_features})"
            )


# --- data ----------------------------------------------------------------------------------------------
def unlabelled_examples(dataset: list[dict[str, Any]]) -> list[int]:
    """Indices of encoded causal-LM examples with no supervised target left (labels[1:] all -100: the
    first position is never a target after the shift)."""
    return [
        i for i, ex in enumerate(dataset)
        if isinstance(ex.get("labels"), list) and all(t == IGNORE_INDEX for t in ex["labels"][1:])
    ]  # fmt: skip


def check_label_tokens(task: Any) -> None:
    """Count the training examples that lose every label token to `task.max_length`; fail when more
    than `task.max_unlabelled_fraction` of them do."""
    dataset = task.train_dataset
    lost = unlabelled_examples(dataset)
    if not lost or not dataset:
        return
    fraction = len(lost) / len(dataset)
    allowed = float(task.cfg.get("max_unlabelled_fraction", 0.0) or 0.0)
    message = (
        f"{len(lost)} of {len(dataset)} training examples ({fraction:.1%}) have no label token left after "
        f"truncation to task.max_length={task.cfg.max_length} (first: {lost[:5]})"
    )
    if fraction > allowed:
        raise ConfigValidationError(
            f"{message}; more than task.max_unlabelled_fraction={allowed}: raise task.max_length"
        )
    log.warning("%s; they add nothing to the loss", message)


def check_task_data(task: Any, eval_cfg: Any) -> None:
    """Read and validate every split the run uses (train, evaluation sets) before training starts."""
    _ = task.train_examples  # file/line errors and label checks happen while reading (astra.data)
    check_label_tokens(task)
    for read in eval_readers(task):
        read()


def eval_readers(task: Any) -> list[Any]:
    """Callables reading each evaluation split the run will use (GLUE dev, NLG evaluation sets)."""
    if hasattr(task, "eval_examples"):
        return [lambda: task.eval_examples]
    if hasattr(task, "present_sets"):  # commonsense: every test file present, read (file/line errors)
        from astra.nlg import read_records

        return [lambda n=n: read_records(task.test_file(n)) for n in task.present_sets]
    return [lambda n=n: task.eval_records(n) for n in task.cfg.get("eval_sets") or []]


# --- config group choices ------------------------------------------------------------------------------
def group_options(conf_dir: Path, group: str) -> list[str]:
    """Every option of config group `group`, nested folders included ('glue/mrpc', 'metamath', ...)."""
    root = conf_dir / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def search_dirs(overrides: list[str], conf_dir: Path) -> list[Path]:
    """`conf_dir` and the `file://` folders a `hydra.searchpath=[...]` override adds (a user's own configs)."""
    extra = [
        o.partition("=")[2].strip("[]") for o in overrides if o.lstrip("+").startswith("hydra.searchpath=")
    ]
    entries = [e.strip().strip("'\"") for value in extra for e in value.split(",")]
    return [conf_dir, *(Path(e.removeprefix("file://")) for e in entries if e.startswith("file://"))]


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Refuse `group=option` overrides naming no file of conf/<group>/ (or of a search-path folder), listing
    every option of the group including nested ones (Hydra lists only the top level)."""
    dirs = search_dirs(overrides, conf_dir)
    for override in overrides:
        group, sep, value = override.partition("=")
        group = group.lstrip("+~")
        plain = sep and not any(c in group for c in ".@") and not any(c in value for c in "()[]{}$")
        if not plain or group.startswith("hydra") or not (conf_dir / group).is_dir():
            continue  # a field override, Hydra's own groups (launchers), or sweep syntax: Hydra checks those
        options = sorted({o for d in dirs if (d / group).is_dir() for o in group_options(d, group)})
        for choice in value.split(","):  # multirun: a,b,c
            if choice and choice != "null" and choice not in options:
                raise ConfigValidationError(  # Hydra's wording, with the nested options listed too
                    f"{group}={choice}: Could not find '{group}/{choice}'{nearest(choice, options)}\n\n"
                    f"Available options in '{group}':\n\t" + "\n\t".join(options)
                )


# --- settings that would have no effect --------------------------------------------------------------
def check_generation_length(cfg: Any) -> None:
    """`eval.max_new_tokens` set away from its default while the task fixes its own length (metamath: 512)
    would be silently ignored (the task's value wins, as the paper's scripts define it): refuse it and
    name the field that does take effect."""
    from astra.config import EvalConfig

    task_value = cfg.task.get("max_new_tokens")
    asked = cfg.eval.get("max_new_tokens")
    if task_value is not None and asked is not None and asked not in (EvalConfig.max_new_tokens, task_value):
        raise ConfigValidationError(
            f"eval.max_new_tokens={asked} has no effect on task {cfg.task.name}: its task.max_new_tokens="
            f"{task_value} wins; set task.max_new_tokens={asked} instead"
        )
