"""The method contract and the registry: types only, no build logic (that is `astra.build`).

A method (Astra and each baseline) is a class registered under the name of its
`conf/method/<name>.yaml`. It declares which statistics it needs (`needs`, one of `STAT_KINDS`, the
values of `astra.stats.StatKind`) and implements, per layer, the pure function

    init(weight (d_out, d_in), stats, spec: LayerSpec) -> LoraInit(A (r, d_in), B (d_out, r), residual)

where `stats` is the layer's `astra.stats.LayerStats` (or, for a method with `reduce`, what its
`reduce` returned, possibly read back from the content cache; None when `needs == "none"`).
`astra.build.build_trainable` is the one path that collects the statistics, calls `reduce`,
`allocate` and `init`, wraps with PEFT and writes the factors. Optional hooks (defaults below):

- `reduce(stats, cfg) -> Reduced`: a rank- and selection-independent summary of one layer's statistics
  (Astra: the eigendecomposition), cached by content; `reduce_options(cfg)` enters the cache key.
- `allocates(cfg)` / `allocate(reduced, targets, cfg)`: per-layer ranks from every layer's summary,
  computed before the PEFT wrap (Astra's effective-rank allocation).
- `wrapped(peft_model, cfg)`: runs once after the PEFT wrap, before any init (LoRA with `use_dora`:
  gives PEFT's DoRA layers `baselines.lora.DoraForward`).
- `build(model, ctx)`: a whole-model procedure, only for a method whose reference implementation must
  stay whole (EVA, documented in `baselines/eva.py`); `build_trainable` times it and nothing else.

Presets are configs: a `conf/method/<name>.yaml` whose `<name>` is no registered method but whose schema
is (`astra_code.yaml` fills `/schema/method/astra@_here_`) registers `<name>` as that method's class
(`register_presets`, run by `load_methods`). `astra_code` and `dora` are such YAMLs and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from astra.config import MethodConfig, register_schema

STAT_KINDS = ("none", "output_cov", "input_cov", "grad")  # = astra.stats.StatKind values
METHOD_PACKAGES = ("baselines",)  # every module of these packages is imported by `load_methods`
METHOD_MODULES = ("astra.astra_init",)
METHOD_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"
SCHEMA_ENTRY = re.compile(r"^/schema/method/(\w+)@_here_$")  # a method YAML's schema in its defaults list


@dataclass
class LoraInit:
    """Initial adapter factors of one linear layer, `W x + s * B (A x)` with `W` -> `residual`."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    residual: torch.Tensor | None = None  # (d_out, d_in) new frozen base weight; None keeps W
    info: dict[str, Any] = field(default_factory=dict)  # per-layer diagnostics for the results JSON


@dataclass
class LayerSpec:
    """What a per-layer `init` needs to know about its layer besides the weight."""

    name: str  # the layer's name in the base model (no PEFT prefix)
    rank: int
    scaling: float  # s in W + s * B A: alpha / r, or alpha / sqrt(r) with rsLoRA
    method: Any  # the method config


@dataclass
class Reduced:
    """A method's rank-independent summary of one layer's statistics (what the content cache holds)."""

    tensors: dict[str, torch.Tensor]  # e.g. Astra: values (d,), vectors (d, d) or its range (d, k)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able (tokens, spectrum summary, ...)


@dataclass
class BuildContext:
    """What a method may use to build its trainable model."""

    cfg: Any  # the resolved run config (DictConfig)
    calib_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None  # fresh iterator per call
    task_type: str = "SEQ_CLS"  # PEFT task type
    cache_dir: str | None = None
    model_id: str = ""  # identity of the base model, for content-keyed caches


@dataclass
class BuildReport:
    """How the trainable model was built; lands in the results JSON."""

    init_seconds: float = 0.0  # wall time of the whole build
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-layer `LoraInit.info` (+ rank)
    extra: dict[str, Any] = field(default_factory=dict)  # calibration summary, cache, allocation, timings


class InitMethod:
    """The contract (see the module docstring). A method subclasses it, sets `name` and the class
    attributes it changes, overrides `init` (and the optional hooks), and is decorated with `register`.
    `get_method(key)` sets the instance's `name` to its registry key (a preset's own name)."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"  # one of STAT_KINDS
    trains_adapters: ClassVar[bool] = True  # False: full fine-tuning, no adapter
    preserves_function: ClassVar[bool] = True  # the model's output is unchanged at step 0
    schema: ClassVar[type] = MethodConfig

    def peft_kwargs(self, cfg: Any) -> dict[str, Any]:
        """Extra `peft.LoraConfig` fields (e.g. `use_dora=True`)."""
        return {}

    def check(self, cfg: Any) -> None:
        """Raise ValueError for option combinations the schema cannot reject (called before any work)."""

    def wrapped(self, peft_model: nn.Module, cfg: Any) -> None:
        """Called once right after the PEFT wrap, before any init (DoRA: swaps in its faster forward)."""

    def stat_options(self, cfg: Any) -> Any:
        """The `astra.stats.StatOptions` of `needs`, read from the method config's statistic fields."""
        from astra.stats import stat_options

        return stat_options(cfg, self.needs)

    def calibration_limit(self, cfg: Any) -> int | None:
        """Use only the first N calibration batches (LoRA-GA's `grad_batches`); None = all."""
        return None

    def init(self, weight: torch.Tensor, stats: Any, spec: LayerSpec) -> LoraInit | None:
        """Per-layer init; None keeps PEFT's own (LoRA, DoRA: `init_lora_weights` via `peft_kwargs`)."""
        return None

    # optional: a cacheable, rank-independent per-layer reduction (None: `init` gets the LayerStats)
    reduce: ClassVar[Callable[..., Reduced] | None] = None

    def reduce_options(self, cfg: Any) -> dict[str, Any]:
        """Options of `reduce` (enter the cache key; never the rank or the selection)."""
        return {}

    def allocates(self, cfg: Any) -> bool:
        """True when `allocate` must see every layer's summary before the wrap (no streaming)."""
        return False

    def allocate(self, reduced: dict[str, Any], targets: dict[str, nn.Linear], cfg: Any) -> dict[str, int]:
        """Per-layer ranks by base-model layer name."""
        raise NotImplementedError(f"method {self.name!r} allocates no ranks")


_REGISTRY: dict[str, type[InitMethod]] = {}


def register(cls: type[InitMethod]) -> type[InitMethod]:
    """Class decorator: add a method to the registry under `cls.name` and its schema to the ConfigStore."""
    if cls.needs not in STAT_KINDS:
        raise ValueError(f"{cls.__name__}.needs={cls.needs!r}; valid: {', '.join(STAT_KINDS)}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name to register under")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"method {cls.name!r} registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})"
        )
    _REGISTRY[cls.name] = cls
    register_schema("method", cls.name, cls.schema)
    return cls


def load_methods() -> list[str]:
    """Import every module of `METHOD_PACKAGES` and `METHOD_MODULES`, so each registers itself."""
    for package in METHOD_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")
    for module in METHOD_MODULES:
        importlib.import_module(module)
    register_presets(METHOD_CONF_DIR)
    return sorted(_REGISTRY)


def register_presets(conf_dir: Path) -> list[str]:
    """Register every `<conf_dir>/<name>.yaml` that fills a registered method's schema under a new name
    as a preset of that method (same class); returns the preset names added."""
    added = []
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        if path.stem in _REGISTRY:
            continue
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        bases = [m.group(1) for d in defaults if isinstance(d, str) and (m := SCHEMA_ENTRY.match(d))]
        if bases and bases[0] in _REGISTRY:
            _REGISTRY[path.stem] = _REGISTRY[bases[0]]
            added.append(path.stem)
    return added


def get_method(name: str) -> InitMethod:
    """An instance of the method registered as `name`; its `name` is the registry key (presets)."""
    if name not in _REGISTRY:
        load_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    method = _REGISTRY[name]()
    method.name = name
    return method


def registered_methods() -> list[str]:
    """Every registered method name (all of them: `load_methods` runs first; imports are cached)."""
    _load_once()
    return sorted(_REGISTRY)


_loaded = False


def _load_once() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        load_methods()
