"""The one build path (`astra.build.build_trainable`) and the method contract (`astra.methods`).

- a toy per-layer method added as two files (a module discovered in `baselines/`, a YAML) is built;
- `needs` is honoured for every registered method: it receives statistics of the declared kind and shape;
- every method claiming it preserves the function at init;
- the content cache is rank- and selection-independent; targets are validated per pattern;
- `git grep`-like: one build path (no `get_peft_model(` outside astra/build.py and baselines/eva.py, no
  method but EVA overrides `build`), no import cycle between the registry and the build.
"""

from __future__ import annotations

import ast
import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

import astra.methods as methods
from astra.build import build_trainable
from astra.methods import BuildContext, Reduced, get_method, load_methods, registered_methods
from astra.stats import LayerStats
from tests.test_baselines import calib, logits, tiny_model

REPO = Path(__file__).resolve().parents[1]
RANK = 4

TOY_MODULE = '''
"""Toy per-layer method: B = the r leading columns of the input covariance's eigenbasis mapped by W."""

import torch

from astra.methods import InitMethod, LoraInit, register


@register
class Toy(InitMethod):
    name = "toy"
    needs = "input_cov"
    calls = []

    def init(self, weight, stats, spec):
        self.calls.append((spec.name, stats.kind, tuple(stats.matrix.shape), tuple(weight.shape)))
        vectors = torch.linalg.eigh(stats.matrix.double())[1][:, -spec.rank:]  # (d_in, r)
        A = vectors.T.to(weight.dtype)  # (r, d_in)
        B = torch.zeros(weight.shape[0], spec.rank, dtype=weight.dtype)
        B[: spec.rank] = torch.eye(spec.rank, dtype=weight.dtype) * 0.1
        residual = weight - spec.scaling * B @ A
        return LoraInit(A=A, B=B, residual=residual, info={"toy": True})
'''
TOY_YAML = """\
# Toy method of tests/test_build.py (shared rank/alpha: assumed).
defaults:
  - /schema/method/base@_here_
  - _self_

name: toy
"""


def context(cfg, batches, task_type: str = "CAUSAL_LM", cache_dir: str | None = None) -> BuildContext:
    return BuildContext(cfg=cfg, calib_batches=lambda: batches, task_type=task_type, cache_dir=cache_dir,
                        model_id="tiny")  # fmt: skip


def llama(compose, method: str, *overrides: str):
    base, _ = tiny_model(compose, "tiny-llama", "CAUSAL_LM")
    cfg = compose(["model=tiny-llama", f"method={method}", f"method.rank={RANK}", *overrides])
    return base.eval(), cfg


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """Adds `toy` as a contributor would: baselines/toy.py + conf/method/toy.yaml (both in tmp folders)."""
    import baselines

    package, conf = tmp_path / "pkg", tmp_path / "conf" / "method"
    package.mkdir()
    conf.mkdir(parents=True)
    (package / "toy.py").write_text(textwrap.dedent(TOY_MODULE))
    (conf / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.setattr(baselines, "__path__", [*baselines.__path__, str(package)])
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    methods._REGISTRY.pop("toy", None)
    sys.modules.pop("baselines.toy", None)


def test_a_toy_method_is_two_files_and_goes_through_the_build(compose, toy_method) -> None:
    assert "toy" in load_methods() and "toy" in registered_methods()  # discovered, no list edited
    base, cfg = llama(compose, "toy", toy_method)
    batches = calib("CAUSAL_LM")
    model, report = build_trainable(copy.deepcopy(base), get_method("toy"), context(cfg, batches))
    calls = type(get_method("toy")).calls
    assert len(calls) == len(report.layers) == 14 and all(kind == "input_cov" for _, kind, _, _ in calls)
    assert all(shape == (w[1], w[1]) for _, _, shape, w in calls)  # (d_in, d_in)
    assert all(info["toy"] and info["rank"] == RANK for info in report.layers.values())
    assert report.extra["calib_tokens"] > 0 and "statistics" in report.extra["timings"]
    for batch in batches:
        torch.testing.assert_close(logits(model.eval(), batch), logits(base, batch), atol=1e-4, rtol=0)


# --- needs honoured by every registered method ---------------------------------------------------------

EXPECTED_SHAPE = {
    "output_cov": lambda w: (w.shape[0], w.shape[0]),
    "input_cov": lambda w: (w.shape[1], w.shape[1]),
    "grad": lambda w: tuple(w.shape),
}


def per_layer_methods() -> list[str]:
    """Registered methods that go through the per-layer path (not full FT, not EVA's own build)."""
    return [
        m
        for m in registered_methods()
        if get_method(m).trains_adapters and not hasattr(get_method(m), "build")
    ]


@pytest.mark.parametrize("name", per_layer_methods())
def test_needs_is_honoured(compose, monkeypatch, name: str) -> None:
    """What reaches `reduce` (if any) or `init` is None for needs=none, else LayerStats of that kind/shape."""
    method = get_method(name)
    cls, seen = type(method), []
    hook = "reduce" if method.reduce is not None else "init"
    original = getattr(cls, hook)

    def spy(self, *args):
        stats = args[0] if hook == "reduce" else args[1]
        weight = dict(base.named_modules())[stats.name].weight if hook == "reduce" else args[0]
        seen.append((stats, weight))
        return original(self, *args)

    monkeypatch.setattr(cls, hook, spy)
    base, cfg = llama(compose, name, "method.cache=false" if hook == "reduce" else "method.rank=4")
    build_trainable(copy.deepcopy(base), method, context(cfg, calib("CAUSAL_LM")))
    assert len(seen) == 14
    for stats, weight in seen:
        if method.needs == "none":
            assert stats is None
        else:
            assert isinstance(stats, LayerStats) and stats.kind == method.needs
            assert tuple(stats.matrix.shape) == EXPECTED_SHAPE[method.needs](weight)
            assert torch.isfinite(stats.matrix).all() and stats.tokens > 0


@pytest.mark.parametrize("name,overrides", [("corda", []), ("astra", ["method.cache=false"]),
                                            ("astra", ["method.cache=false", "method.rank_allocation=effective_rank"])])  # fmt: skip
def test_inits_are_written_as_statistics_arrive(
    compose, monkeypatch, name: str, overrides: list[str]
) -> None:
    """Streaming: each layer's init is written before the next layer's statistics are produced (one
    block's statistics alive), except with rank allocation, which needs every spectrum first."""
    import astra.build

    events, method = [], get_method(name)
    collect, init = astra.build.collect, type(method).init

    def logged_collect(*args, **kwargs):
        for layer, stats in collect(*args, **kwargs):
            events.append(("stats", layer))
            yield layer, stats

    def logged_init(self, weight, stats, spec):
        events.append(("init", spec.name))
        return init(self, weight, stats, spec)

    monkeypatch.setattr(astra.build, "collect", logged_collect)
    monkeypatch.setattr(type(method), "init", logged_init)
    base, cfg = llama(compose, name, *overrides)
    build_trainable(copy.deepcopy(base), method, context(cfg, calib("CAUSAL_LM")))
    layers = [layer for kind, layer in events if kind == "stats"]
    assert len(layers) == 14 and [layer for kind, layer in events if kind == "init"] == layers
    if "method.rank_allocation=effective_rank" in overrides:
        assert events == [("stats", n) for n in layers] + [("init", n) for n in layers]
    else:
        assert events == [event for n in layers for event in (("stats", n), ("init", n))]


# --- function preserved at init -------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,task_type", [("tiny-llama", "CAUSAL_LM"), ("tiny-bert", "SEQ_CLS")])
@pytest.mark.parametrize("name", registered_methods())
def test_function_preserved_for_every_method_claiming_it(
    compose, name: str, model_name: str, task_type
) -> None:
    method = get_method(name)
    if not method.preserves_function:
        pytest.skip(f"{name} does not claim to preserve the function at init")
    base, _ = tiny_model(compose, model_name, task_type)
    cfg = compose([f"model={model_name}", f"method={name}", f"method.rank={RANK}"])
    batches = calib(task_type)
    model, _ = build_trainable(copy.deepcopy(base).eval(), method, context(cfg, batches, task_type))
    for batch in batches:
        torch.testing.assert_close(logits(model.eval(), batch), logits(base.eval(), batch), atol=1e-4, rtol=0)


# --- cache, targets ---------------------------------------------------------------------------------------


def test_cache_is_rank_and_selection_independent(compose, tmp_path) -> None:
    batches = calib("CAUSAL_LM")
    reports = []
    for rank, select in [(4, "tail"), (2, "head"), (3, "random")]:
        base, cfg = llama(compose, "astra", f"method.rank={rank}", f"method.select={select}")
        ctx = context(cfg, batches, cache_dir=str(tmp_path / "cache"))
        model, report = build_trainable(copy.deepcopy(base), get_method("astra"), ctx)
        reports.append(report)
        torch.testing.assert_close(
            logits(model.eval(), batches[0]), logits(base, batches[0]), atol=1e-4, rtol=0
        )
        assert {info["rank"] for info in report.layers.values()} == {rank}
    assert [r.extra["cache"] for r in reports] == ["miss", "hit", "hit"]
    assert all("statistics" not in r.extra["timings"] for r in reports[1:])  # no calibration forward on a hit
    base, cfg = llama(compose, "astra", "method.centered=false")  # a statistic option is part of the key
    _, report = build_trainable(
        copy.deepcopy(base), get_method("astra"), context(cfg, batches, cache_dir=str(tmp_path / "cache"))
    )
    assert report.extra["cache"] == "miss"


def test_cached_reduction_equals_a_fresh_one(compose, tmp_path) -> None:
    batches = calib("CAUSAL_LM")
    factors = []
    for cache_dir in (tmp_path / "a", tmp_path / "a", None):
        base, cfg = llama(compose, "astra")
        ctx = context(cfg, batches, cache_dir=str(cache_dir) if cache_dir else None)
        model, _ = build_trainable(copy.deepcopy(base), get_method("astra"), ctx)
        factors.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n})
    for name in factors[0]:
        assert torch.equal(factors[0][name], factors[1][name]) and torch.equal(
            factors[0][name], factors[2][name]
        )


@pytest.mark.parametrize("name", ["astra", "corda"])
def test_stats_offload_reaches_the_engine_and_changes_nothing(compose, monkeypatch, name: str) -> None:
    import astra.stats

    batches, seen, factors = calib("CAUSAL_LM"), [], []
    real = astra.stats.HiddenStates
    monkeypatch.setattr(
        astra.stats, "HiddenStates", lambda offload, device: seen.append(offload) or real(offload, device)
    )
    for overrides in ([], ["method.stats_offload=disk"]):
        base, cfg = llama(
            compose, name, "method.cache=false" if name == "astra" else "method.rank=4", *overrides
        )
        model, _ = build_trainable(copy.deepcopy(base), get_method(name), context(cfg, batches))
        factors.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    assert seen == ["none", "disk"]
    for key in factors[0]:
        assert torch.equal(factors[0][key], factors[1][key]), key
    with pytest.raises(ConfigCompositionException) as err:
        llama(compose, name, "method.stats_offload=ssd")
    assert "expected one of [none, cpu, disk]" in str(err.value.__cause__)


def test_rank_allocation_reads_summaries_back_from_the_cache(compose, tmp_path, monkeypatch) -> None:
    """With a cache, the allocation sees lazily read summaries (not all held) and gives the same model."""
    import astra.build

    kinds, allocate = [], type(get_method("astra")).allocate

    def spy(self, reduced, targets, cfg):
        kinds.append(type(reduced))
        return allocate(self, reduced, targets, cfg)

    monkeypatch.setattr(type(get_method("astra")), "allocate", spy)
    batches, models = calib("CAUSAL_LM"), []
    for cache_dir in (str(tmp_path / "c"), str(tmp_path / "c"), None):  # miss, hit, off
        base, cfg = llama(compose, "astra", "method.rank_allocation=effective_rank", "method.rank=2")
        model, report = build_trainable(
            copy.deepcopy(base), get_method("astra"), context(cfg, batches, cache_dir=cache_dir)
        )
        models.append((report.extra["rank_allocation"], dict(model.named_parameters())))
        torch.testing.assert_close(
            logits(model.eval(), batches[0]), logits(base, batches[0]), atol=1e-4, rtol=0
        )
    assert kinds == [astra.build.CachedSummaries, astra.build.CachedSummaries, dict]
    assert models[0][0] == models[1][0] == models[2][0] and len(set(models[0][0].values())) > 1
    for name, param in models[0][1].items():
        assert torch.equal(param, models[1][1][name]) and torch.equal(param, models[2][1][name]), name


def test_every_target_pattern_must_match(compose) -> None:
    base, cfg = llama(compose, "lora", "method.target_modules=[q_proj,qproj]")
    with pytest.raises(ValueError, match="target module 'qproj' matches no linear layer"):
        build_trainable(base, get_method("lora"), context(cfg, calib("CAUSAL_LM")))


def test_full_ft_trains_everything_and_reports_time(compose) -> None:
    base, cfg = llama(compose, "full_ft")
    for p in base.parameters():
        p.requires_grad_(False)
    model, report = build_trainable(base, get_method("full_ft"), context(cfg, []))
    assert model is base and all(p.requires_grad for p in model.parameters()) and report.init_seconds >= 0


# --- one build path, one dependency direction (source walks) --------------------------------------------


def sources() -> dict[str, str]:
    roots = ["astra", "baselines", "experiments", "analysis"]
    return {str(p.relative_to(REPO)): p.read_text() for r in roots for p in sorted((REPO / r).rglob("*.py"))}


def test_one_build_path() -> None:
    wrapping = sorted(path for path, text in sources().items() if "get_peft_model(" in text)
    assert wrapping == ["astra/build.py", "baselines/eva.py"]
    own_builds = sorted(m for m in registered_methods() if "build" in vars(type(get_method(m))))
    assert own_builds == ["eva"]  # the documented exception
    assert not (REPO / "astra" / "adapters.py").exists()
    for path, text in sources().items():  # statistics travel as values, never as module attributes
        assert "GRAD_ATTR" not in text and "attach=" not in text, path


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return found | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_registry_has_no_build_logic_and_no_cycle() -> None:
    assert imports_of(REPO / "astra" / "methods.py") & {"astra.build", "astra.adapters", "peft"} == set()
    for path in [REPO / "astra" / "build.py", *sorted((REPO / "baselines").glob("*.py"))]:
        assert not {
            m for m in imports_of(path) if m in ("astra.run", "astra.pipeline") or m.startswith("analysis")
        }, path
    text = (REPO / "astra" / "methods.py").read_text()
    assert "class Timer" not in text and "get_peft_model" not in text


def test_reduced_summary_is_what_init_takes(compose) -> None:
    """A method's `reduce` output is a `Reduced` of tensors + JSON-able meta (what the cache stores)."""
    import json

    for name in registered_methods():
        method = get_method(name)
        if method.reduce is None:
            continue
        w = torch.randn(6, 4)
        stats = LayerStats(name="l", kind=method.needs, matrix=torch.eye(6) + 0.1, tokens=100, samples=2)
        reduced = method.reduce(stats, compose([f"method={name}"]).method)
        assert isinstance(reduced, Reduced) and all(
            isinstance(t, torch.Tensor) for t in reduced.tensors.values()
        )
        json.dumps(reduced.meta)
        assert w.shape[0] == reduced.tensors["vectors"].shape[0]


def test_presets_are_configs_not_subclasses(compose, tmp_path) -> None:
    assert type(get_method("astra_code")) is type(get_method("astra"))
    assert type(get_method("dora")) is type(get_method("lora"))
    assert get_method("astra_code").name == "astra_code"
    code = sources()
    assert '"astra_code"' not in code["astra/astra_init.py"] and '"dora"' not in code["baselines/lora.py"]
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "pissa_fast.yaml").write_text(
        "# a preset in one file (test)\ndefaults:\n  - /schema/method/pissa@_here_\n  - _self_\n\n"
        "name: pissa_fast\nniter: 4  # assumed (test)\n"
    )
    try:
        assert methods.register_presets(tmp_path / "method") == ["pissa_fast"]
        assert type(get_method("pissa_fast")) is type(get_method("pissa"))
        base, cfg = llama(compose, "pissa_fast", f"hydra.searchpath=[file://{tmp_path}]")
        assert cfg.method.niter == 4 and cfg.method.name == "pissa_fast"
        model, report = build_trainable(copy.deepcopy(base), get_method("pissa_fast"), context(cfg, []))
        assert len(report.layers) == 14
    finally:
        methods._REGISTRY.pop("pissa_fast", None)
