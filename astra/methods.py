"""The method registry and the protocol every method (Astra and each baseline) implements.

A method is registered under the name of its `conf/method/<name>.yaml`. Per layer it is a pure
function `init(weight, stats, cfg) -> LoraInit`; writing a `LoraInit` into a PEFT model is done
once, here, for every method (`apply_init`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from astra.config import MethodConfig, register_schema

STAT_KINDS = ("none", "output_cov", "input_cov", "grad")


@dataclass
class LoraInit:
    """Initial adapter factors of one linear layer, `W x + s * B (A x)` with `W` -> `residual`."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    residual: torch.Tensor | None = None  # (d_out, d_in) new frozen base weight; None keeps W
    info: dict[str, Any] = field(default_factory=dict)  # per-layer diagnostics for the results JSON


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

    init_seconds: float = 0.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class InitMethod:
    """Base class: LoRA adapters on the target modules, optionally re-initialised per layer."""

    name: ClassVar[str]
    needs: ClassVar[str] = "none"  # which statistics `init` takes: one of STAT_KINDS
    trains_adapters: ClassVar[bool] = True  # False: full fine-tuning, no adapter
    schema: ClassVar[type] = MethodConfig
    preserves_function: ClassVar[bool] = True  # the model's output is unchanged at step 0

    def peft_kwargs(self, cfg: Any) -> dict[str, Any]:
        """Extra `peft.LoraConfig` fields (e.g. `init_lora_weights="pissa"`, `use_dora=True`)."""
        return {}

    def init(self, weight: torch.Tensor, stats: torch.Tensor | None, cfg: Any) -> LoraInit | None:
        """Per-layer initialisation from `weight` (d_out, d_in) and its statistics; None keeps PEFT's."""
        return None

    def build(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, BuildReport]:
        """Wrap `model` with LoRA adapters and initialise them. Override for whole-model procedures."""
        from astra.adapters import build_lora_model

        return build_lora_model(model, self, ctx)


_REGISTRY: dict[str, type[InitMethod]] = {}


def register(cls: type[InitMethod]) -> type[InitMethod]:
    """Class decorator: add a method to the registry and its schema to the ConfigStore."""
    if cls.needs not in STAT_KINDS:
        raise ValueError(f"{cls.__name__}.needs={cls.needs!r}; valid: {', '.join(STAT_KINDS)}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    register_schema("method", cls.name, cls.schema)
    return cls


def get_method(name: str) -> InitMethod:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
