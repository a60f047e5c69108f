"""Effective-rank probes: a trainer callback that records, at chosen steps, per target layer

- `update`: erank of the weight update dW = W_t - W_0 (W = the layer's effective weight, base + s B A),
- `adapter`: erank of the learned adapter product s B A (LoRA-type methods only),
- `output_cov`: erank of the covariance of the layer's output activations on a fixed probe set.

Step 0 is the initialised model before any update; the final step is always recorded, so every probed
run has "before" and "after" values. Records land in `train_info.rank_probes` of the results JSON.

Cost: LoRA updates are probed through their low-rank factors (a (2r, 2r) SVD per layer); full
fine-tuning keeps a CPU copy of every target weight and runs a dense SVD per layer and probe; the
output covariance holds one (d_out, d_out) float64 accumulator per target layer on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from astra.common import PEFT_PREFIX
from astra.erank import (
    by_module_type,
    covariance_effective_rank,
    effective_rank,
    lowrank_singular_values,
    spectrum_effective_rank,
    storage_noise_floor,
)
from astra.models import eval_mode, model_device
from astra.stats import CovarianceAccumulator, StatOptions

# Output covariance of the probe set: centred, padding masked, per token, accumulated in float64.
PROBE_STATS = StatOptions(
    side="output", centered=True, mask_padding=True, normalizer="tokens", accum_dtype="fp64"
)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith(f".{t}") for t in targets)


def probe_layers(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Target layers by a name shared between PEFT-wrapped and plain models (PEFT prefix removed).

    A PEFT LoRA layer is taken whole (its output includes the adapter); in a plain model (full
    fine-tuning) the `nn.Linear` whose name ends in a target, as PEFT matches `target_modules`.
    """
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or (isinstance(module, nn.Linear) and _matches(name, targets)):
            if isinstance(module, nn.Linear) and ".lora_" in name:
                continue  # the lora_A / lora_B sub-layers of a wrapped layer
            layers[name.removeprefix(PEFT_PREFIX)] = module
    if not layers:
        raise ValueError(f"no target layers for rank probes: none of {list(targets)} matches a linear layer")
    return layers


def _is_plain_lora(layer: nn.Module, adapter: str) -> bool:
    """Frozen base and an update that is exactly s B A: the low-rank path applies."""
    return (
        isinstance(layer, LoraLayer)
        and adapter in layer.lora_A
        and not layer.use_dora.get(adapter, False)
        and not layer.get_base_layer().weight.requires_grad
    )


def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s B (d_out, r), A^T (d_in, r)) so that `left @ right.T = s B A`, detached on the CPU."""
    s = layer.scaling[adapter]
    b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
    return (s * b).detach().double().cpu(), a.detach().double().T.cpu()


def _dense_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """Effective weight (base + adapter delta) as a float64 CPU copy."""
    if isinstance(layer, LoraLayer):
        base = layer.get_base_layer().weight
        delta = layer.get_delta_weight(adapter) if adapter in layer.lora_A else 0
        return (base + delta).detach().double().cpu()
    return layer.weight.detach().double().cpu()


def _stored_weight(layer: nn.Module) -> torch.Tensor:
    """The parameter that training writes, in its storage dtype (sets the round-off floor of dW)."""
    return layer.get_base_layer().weight if isinstance(layer, LoraLayer) else layer.weight


def lowrank_floor(left: torch.Tensor, right: torch.Tensor) -> float:
    """Round-off level of `left @ right.T` computed in float64: with B_t A_t = B_0 A_0 (no step taken
    yet, a non-zero init such as Astra's or PiSSA's) every singular value is noise at this level,
    and a relative tolerance alone would count that noise as rank."""
    scale = float(torch.linalg.matrix_norm(left, 2) * torch.linalg.matrix_norm(right, 2))
    return scale * max(left.shape[0], right.shape[0]) * torch.finfo(torch.float64).eps


class RankProbeCallback(TrainerCallback):
    """Records `update`, `adapter` and `output_cov` effective ranks per layer at the chosen steps."""

    def __init__(
        self,
        model: nn.Module,
        steps: Sequence[int],
        targets: Sequence[str],
        batches: Sequence[dict[str, torch.Tensor]] = (),
        adapter: str = "default",
        sink: Callable[[dict[str, float]], None] | None = None,
    ):
        self.model, self.steps, self.batches, self.adapter, self.sink = (
            model,
            set(steps),
            batches,
            adapter,
            sink,
        )
        self.layers = probe_layers(model, targets)
        self.initial = {name: self._snapshot(layer) for name, layer in self.layers.items()}
        self.records: list[dict[str, Any]] = []

    def _snapshot(self, layer: nn.Module) -> Any:
        return (
            _factors(layer, self.adapter)
            if _is_plain_lora(layer, self.adapter)
            else _dense_weight(layer, self.adapter)
        )

    def update_ranks(self) -> dict[str, float]:
        """erank(W_t - W_0) per layer; for plain LoRA dW = [s B_t, -s B_0] [A_t; A_0] (rank <= 2r)."""
        ranks = {}
        for name, layer in self.layers.items():
            start = self.initial[name]
            if isinstance(start, tuple):
                left_t, right_t = _factors(layer, self.adapter)
                left = torch.cat([left_t, -start[0]], dim=1)  # (d_out, 2r)
                right = torch.cat([right_t, start[1]], dim=1)  # (d_in, 2r)
                ranks[name] = spectrum_effective_rank(
                    lowrank_singular_values(left, right), atol=lowrank_floor(left, right)
                )
            else:
                current = _dense_weight(layer, self.adapter)
                floor = storage_noise_floor(_stored_weight(layer))
                ranks[name] = effective_rank(current - start, atol=floor)
        return ranks

    def adapter_ranks(self) -> dict[str, float]:
        """erank(s B A) per LoRA layer (empty for full fine-tuning)."""
        return {
            name: spectrum_effective_rank(lowrank_singular_values(*_factors(layer, self.adapter)))
            for name, layer in self.layers.items()
            if isinstance(layer, LoraLayer) and self.adapter in layer.lora_A
        }

    @torch.no_grad()
    def output_cov_ranks(self) -> dict[str, float]:
        """erank of each layer's centred output covariance over the non-padding tokens of the probe set.

        The statistics engine's accumulator forms the covariance (float64, centred, divided by tokens),
        on the CPU so that a probe never holds (d_out, d_out) buffers on the accelerator.
        """
        if not self.batches:
            return {}
        accumulators = {name: CovarianceAccumulator(name, PROBE_STATS) for name in self.layers}
        current: dict[str, Any] = {"mask": None, "index": 0}

        def hook(name: str) -> Callable:
            def accumulate(module: nn.Module, inputs: Any, output: Any) -> None:
                y = (output[0] if isinstance(output, tuple) else output).detach().cpu()  # (batch, seq, d_out)
                mask = current["mask"]
                aligned = mask is not None and tuple(mask.shape) == tuple(y.shape[:2])
                accumulators[name].add(y, mask.cpu() if aligned else None, current["index"])

            return accumulate

        handles = [layer.register_forward_hook(hook(name)) for name, layer in self.layers.items()]
        device = model_device(self.model)
        try:
            with eval_mode(self.model):
                for index, batch in enumerate(self.batches):
                    current.update(mask=batch.get("attention_mask"), index=index)
                    self.model(**{k: v.to(device) for k, v in batch.items()})
        finally:
            for handle in handles:
                handle.remove()
        return {name: covariance_effective_rank(acc.covariance()) for name, acc in accumulators.items()}

    def record(self, step: int) -> None:
        if any(r["step"] == step for r in self.records):
            return
        row = {"step": step, "update": self.update_ranks(), "adapter": self.adapter_ranks()}
        row["output_cov"] = self.output_cov_ranks()
        self.records.append(row)
        if self.sink:
            flat = {f"rank/{q}/{kind}": v for q in ("update", "adapter", "output_cov")
                    for kind, v in by_module_type(row[q]).items()}  # fmt: skip
            self.sink({"step": step, **flat})

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (transformers API)
        if 0 in self.steps:
            self.record(0)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step in self.steps:
            self.record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.record(state.global_step)


def probe_batches(task: Any, samples: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first `samples` training examples, collated: the fixed set every output-covariance probe uses."""
    examples = task.train_dataset[:samples]
    return list(DataLoader(examples, batch_size=batch_size, collate_fn=task.collator()))


def make_rank_probe(
    model: nn.Module, task: Any, cfg: Any, sink: Callable | None = None
) -> RankProbeCallback | None:
    """The probe callback a run config asks for (`trainer.rank_probe_steps`), or None when it asks none."""
    steps = list(cfg.trainer.get("rank_probe_steps") or [])
    if not steps:
        return None
    targets = list(cfg.method.get("target_modules") or cfg.model.target_modules)
    batches = probe_batches(task, cfg.trainer.rank_probe_samples, cfg.trainer.eval_batch_size)
    return RankProbeCallback(model, steps, targets, batches, sink=sink)
