"""The method registry is the single source of every method list (DESIGN.md sections 2-3).

- every registered method has `conf/method/<name>.yaml` naming it, and every such YAML a registered method;
- the lists derived from the registry contain every method: the method axis of each sweep that claims
  "all methods", the analysis colours and order, the baseline test matrix;
- adding a per-layer method is two files: a module in `baselines/` and its YAML. The toy method below is
  written as exactly those two files (in a tmp folder put on the package and config search paths); nothing
  else is edited, and it is registered, composes, builds through the one build path with the model's
  function preserved, and appears in every derived list.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from astra.methods import get_method, load_methods

REPO = Path(__file__).resolve().parent.parent
METHOD_CONF = REPO / "conf" / "method"
SWEEP_CONF = REPO / "conf" / "sweep"
TOY = "toy_rows"
TOY_MODULE = f'''
"""Toy per-layer method (tests/test_registry.py): A = the first r rows of W, B = the first r unit vectors,
residual W - s B A, so the model is unchanged at init."""

import torch

from astra.methods import InitMethod, LoraInit, register


@register
class ToyRows(InitMethod):
    name = "{TOY}"

    def init(self, weight: torch.Tensor, stats, spec) -> LoraInit:
        A = weight[: spec.rank].clone()  # (r, d_in)
        B = torch.eye(weight.shape[0], spec.rank, dtype=weight.dtype)  # (d_out, r)
        return LoraInit(A=A, B=B, residual=weight - spec.scaling * B @ A, info={{"toy": True}})
'''
TOY_YAML = f"""
# Toy per-layer method of tests/test_registry.py (not a real method).
defaults:
  - /schema/method/{TOY}@_here_
  - _self_

name: {TOY}
"""


def yaml_methods() -> set[str]:
    return {p.stem for p in METHOD_CONF.glob("*.yaml")}


def compose(*overrides: str):
    from astra.pipeline import compose_config

    return compose_config(list(overrides))


# --- the registry and the YAML files ---------------------------------------------------------------------
def assert_registry_matches(yamls: set[str]) -> None:
    registered = set(load_methods())
    assert registered == yamls, (
        f"registered without conf/method/<name>.yaml: {sorted(registered - yamls)}; "
        f"YAML without a registered method: {sorted(yamls - registered)}"
    )


def test_every_registered_method_has_its_yaml_and_back():
    assert_registry_matches(yaml_methods())


@pytest.mark.parametrize("name", sorted(yaml_methods()))
def test_each_method_yaml_composes_to_its_registered_name(name):
    cfg = compose(f"method={name}")
    assert cfg.method.name == name and get_method(name).name == name


# --- the lists derived from the registry ------------------------------------------------------------------
SEARCHPATH: list[str] = []  # extra config folders (the toy method's), seen by `glob(*)` axes as by Hydra


def sweep_method_axis(path: Path) -> list[str] | None:
    """The methods a sweep file expands to (None: the sweep has no method axis), resolved as Hydra would."""
    from astra.sweeps import expand

    if OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params.method", default=None) is None:
        return None
    jobs = expand(path.stem, compose_overrides=SEARCHPATH)
    return sorted({o.split("=", 1)[1] for job in jobs for o in job if o.startswith("method=")})


def claims_all_methods(path: Path) -> bool:
    return bool(
        re.search(r"\ball methods\b", OmegaConf.select(OmegaConf.load(path), "sweep.description") or "")
    )


def sweeps_claiming_all_methods() -> list[Path]:
    return [p for p in sorted(SWEEP_CONF.glob("*.yaml")) if claims_all_methods(p)]


def test_sweeps_claiming_all_methods_expand_to_the_registry():
    compose()  # registers the resolvers and schemas the sweep files may use
    registered = set(load_methods())
    wrong = {
        p.name: sorted(registered.symmetric_difference(sweep_method_axis(p) or []))
        for p in sweeps_claiming_all_methods()
    }
    wrong = {name: diff for name, diff in wrong.items() if diff}
    assert sweeps_claiming_all_methods(), "no sweep claims all methods: the check would be empty"
    assert not wrong, f"sweeps that claim all methods but differ from the registry (difference): {wrong}"


def test_sweeps_name_only_registered_methods():
    compose()
    registered = set(load_methods())
    unknown = {
        p.name: sorted(set(axis) - registered)
        for p in sorted(SWEEP_CONF.glob("*.yaml"))
        if (axis := sweep_method_axis(p)) and set(axis) - registered
    }
    assert not unknown, unknown


def derived_lists() -> dict[str, set[str]]:
    """Every method list derived from the registry, recomputed now (after any registration)."""
    from analysis.store import PAPER_METHODS, method_order
    from analysis.style import method_colors

    registered = load_methods()
    colors = method_colors(registered)
    assert len(set(colors.values())) == len(colors), "two methods share a colour"
    assert set(PAPER_METHODS) <= set(registered), "PAPER_METHODS names an unregistered method"
    matrix = importlib.reload(importlib.import_module("tests.test_baselines"))  # its lists, re-derived
    lists = {
        "analysis colours": set(colors),
        "analysis order": set(method_order(registered)),
        "baseline test matrix": set(matrix.ALL_METHODS) | {m for m in registered if m.startswith("astra")},
    }
    lists |= {f"sweep {p.name}": set(sweep_method_axis(p) or []) for p in sweeps_claiming_all_methods()}
    return lists


def test_every_derived_list_holds_every_registered_method():
    registered = set(load_methods())
    missing = {
        name: sorted(registered - found) for name, found in derived_lists().items() if registered - found
    }
    assert not missing, f"methods missing from registry-derived lists: {missing}"


# --- adding a per-layer method: two files --------------------------------------------------------------------
@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """The two files a contributor writes, on the package path of `baselines` and Hydra's search path."""
    import baselines

    module_dir, conf_dir = tmp_path / "baselines", tmp_path / "conf"
    (conf_dir / "method").mkdir(parents=True)
    module_dir.mkdir()
    (module_dir / f"{TOY}.py").write_text(textwrap.dedent(TOY_MODULE))
    (conf_dir / "method" / f"{TOY}.yaml").write_text(textwrap.dedent(TOY_YAML))
    monkeypatch.setattr(baselines, "__path__", [*baselines.__path__, str(module_dir)])
    searchpath = f"hydra.searchpath=[file://{conf_dir}]"
    monkeypatch.setattr(sys.modules[__name__], "SEARCHPATH", [searchpath])
    yield searchpath
    import astra.methods

    astra.methods._REGISTRY.pop(TOY, None)  # leave the registry as the real tree defines it
    sys.modules.pop(f"baselines.{TOY}", None)
    importlib.reload(importlib.import_module("tests.test_baselines"))


def test_a_toy_per_layer_method_is_two_files_and_appears_everywhere(toy_method):
    assert TOY not in yaml_methods()  # really not in the tree
    assert TOY in load_methods()  # discovered: no hand-kept import list
    assert_registry_matches(yaml_methods() | {TOY})
    cfg = compose("model=tiny-bert", "task=glue/mrpc", f"method={TOY}", "method.rank=2", toy_method)
    assert cfg.method.name == TOY
    missing = [name for name, found in derived_lists().items() if TOY not in found]
    assert not missing, f"the new method {TOY!r} is missing from: {missing}"
    assert_builds_with_function_preserved(cfg)


def assert_builds_with_function_preserved(cfg) -> None:
    """The toy goes through the one build path (`astra.build.build_trainable`) like every method."""
    from astra.build import build_trainable
    from astra.methods import BuildContext
    from astra.models import load_model

    model, tok, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=0)
    batch = dict(tok(["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt"))
    model.eval()
    with torch.no_grad():
        base = model(**batch).logits
    ctx = BuildContext(cfg=cfg, task_type="SEQ_CLS", cache_dir=cfg.paths.cache_dir, model_id=model_id)
    trainable, report = build_trainable(model, get_method(TOY), ctx)
    trainable.eval()
    with torch.no_grad():
        assert torch.allclose(trainable(**batch).logits, base, atol=1e-5)
    assert len(report.layers) == 12 and all(info.get("toy") for info in report.layers.values())
