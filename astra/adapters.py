"""Shared machinery that turns a method's per-layer `LoraInit`s into a trainable PEFT model."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from astra.methods import BuildContext, BuildReport, InitMethod, LoraInit, Timer


@dataclass
class LayerSpec:
    """What a per-layer `init` needs to know about its layer besides the weight."""

    name: str
    rank: int
    scaling: float  # s in W + s * B A: alpha / r, or alpha / sqrt(r) with rsLoRA
    method: Any  # the method config


def lora_config(method: InitMethod, ctx: BuildContext) -> LoraConfig:
    m, model = ctx.cfg.method, ctx.cfg.model
    targets = list(m.target_modules or model.target_modules)
    if not targets:
        raise ValueError(
            f"model {model.name!r} declares no target_modules and method.target_modules is unset"
        )
    return LoraConfig(
        r=m.rank,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        use_rslora=m.use_rslora,
        target_modules=targets,
        rank_pattern=dict(m.rank_pattern),
        task_type=ctx.task_type,
        **method.peft_kwargs(m),
    )


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Fail with the names that exist when no linear layer matches the target suffixes."""
    linears = {name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if not any(name == t or name.endswith(f".{t}") for name in linears for t in targets):
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(
            f"target_modules {targets} match no linear layer; linear layer names end in: {suffixes}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Adapter-wrapped linear layers by their name in the PEFT model."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def layer_spec(name: str, layer: LoraLayer, method_cfg: Any, adapter: str = "default") -> LayerSpec:
    return LayerSpec(name=name, rank=layer.r[adapter], scaling=layer.scaling[adapter], method=method_cfg)


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@torch.no_grad()
def apply_init(layer: LoraLayer, init: LoraInit, adapter: str = "default") -> None:
    """Write A, B (and the residual base weight) into a PEFT LoRA layer, keeping dtypes."""
    targets = [(layer.lora_A[adapter].weight, init.A), (layer.lora_B[adapter].weight, init.B)]
    if init.residual is not None:
        targets.append((layer.get_base_layer().weight, init.residual))
    for param, value in targets:
        if param.shape != value.shape:
            raise ValueError(f"init shape {tuple(value.shape)} does not match parameter {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


def build_lora_model(
    model: nn.Module, method: InitMethod, ctx: BuildContext
) -> tuple[nn.Module, BuildReport]:
    """Default `InitMethod.build`: PEFT LoRA wrap, then the method's per-layer init if it has one."""
    report = BuildReport()
    config = lora_config(method, ctx)
    check_targets(model, sorted(config.target_modules))
    with Timer() as timer:
        peft_model = get_peft_model(model, config)
        if type(method).init is not InitMethod.init:
            init_layers(peft_model, method, ctx, report)
    report.init_seconds = timer.seconds
    return peft_model, report


def init_layers(peft_model: nn.Module, method: InitMethod, ctx: BuildContext, report: BuildReport) -> None:
    """Run `method.init` on every adapter layer, statistics streamed block by block when needed."""
    layers = lora_layers(peft_model)
    if method.needs == "none":
        per_layer = ((name, None) for name in layers)
    else:
        from astra.stats import layer_statistics

        per_layer = layer_statistics(peft_model, layers, method.needs, ctx, report)
    init_each(layers, per_layer, method, ctx.cfg.method, report)


def init_each(
    layers: dict[str, LoraLayer],
    per_layer: Iterable[tuple[str, Any]],
    method: InitMethod,
    method_cfg: Any,
    report: BuildReport,
) -> None:
    """`method.init(W, stats, spec)` for each `(name, stats)` as it arrives, written in at once.

    Consuming lazily matters: a block-wise statistics stream collects block k+1 only after block k's
    function-preserving inits are in, and each layer's statistics are freed after its init.
    """
    for name, stats in per_layer:
        layer = layers[name]
        init = method.init(layer.get_base_layer().weight, stats, layer_spec(name, layer, method_cfg))
        if init is not None:
            apply_init(layer, init)
            report.layers[name] = init.info
