"""EVA (Paischer et al., 2024, arXiv 2410.07170): explained variance adaptation, through PEFT.

Statistics: the inputs X (tokens, d_in) of every target layer on the calibration batches (the same
samples as Astra; padding and, with `use_label_mask`, label-masked tokens dropped), decomposed by PEFT's
incremental PCA (centred), batch after batch until the top components are stable (cosine >= tau).
Init (PEFT's `initialize_lora_eva_weights`): `A` = the top right-singular vectors (principal directions
of the centred inputs) and `B = 0`, so the function is preserved. With `rho > 1` the ranks are
redistributed across layers by explained variance (each layer at most `rho * r`, total budget kept), so
per-layer ranks and the trainable parameter count differ from the other methods; `rho = 1` keeps r everywhere.

EVA is the ONE method with its own `build` (the documented exception to `astra.build`'s single path):
its statistics are not a finished per-layer matrix but PEFT's incremental PCA, fed batch after batch,
whose stopping rule (per-component convergence) and rank redistribution (`rho`) decide which layers
still need data and how many components each keeps. Re-implementing that loop on top of
`collect_statistics` would mean re-writing PEFT's reference implementation; we keep it whole instead,
behind the same LoRA config (`astra.build.lora_config`), targets rule and report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import EvaConfig, get_peft_model
from peft.tuners.lora import initialize_lora_eva_weights
from torch import nn

from astra.build import calibration, lora_config, target_linears, wrapped_layers
from astra.common import IGNORE_INDEX
from astra.config import MethodConfig
from astra.methods import BuildContext, BuildReport, InitMethod, register
from baselines.common import without_labels


@dataclass
class EVAMethodConfig(MethodConfig):
    rho: float = 1.0  # max rank per layer = rho * r; 1.0 = no redistribution (equal budget); paper/PEFT: 2.0
    tau: float = 0.99  # cosine threshold at which a component counts as converged (PEFT default)
    use_label_mask: bool = True  # causal LM: drop tokens whose label is -100 (the prompt), as PEFT does
    whiten: bool = False  # divide A's rows by the square root of their singular values
    adjust_scaling_factors: bool = True  # with rho > 1: alpha scaled by new_rank / r
    max_passes: int = 50  # PEFT cycles the calibration batches until convergence; fail after this many passes


def eva_config(cfg: Any) -> EvaConfig:
    if cfg.rho < 1.0 or not 0.0 <= cfg.tau <= 1.0:
        raise ValueError(f"eva: method.rho={cfg.rho} must be >= 1 and method.tau={cfg.tau} in [0, 1]")
    return EvaConfig(rho=cfg.rho, tau=cfg.tau, use_label_mask=cfg.use_label_mask, whiten=cfg.whiten,
                     adjust_scaling_factors=cfg.adjust_scaling_factors, label_mask_value=IGNORE_INDEX)  # fmt: skip


def token_indices(batch: dict[str, torch.Tensor], peft_config: Any) -> torch.Tensor:
    """(n_tokens, 2) indices (row, position) of the tokens EVA decomposes: real tokens, minus masked labels.

    PEFT's default applies the label mask to any `labels`; classification labels are (batch,), not
    per token, so here only token labels (batch, seq) mask anything.
    """
    mask = batch["attention_mask"].bool()  # (batch, seq)
    labels = batch.get("labels")
    if peft_config.eva_config.use_label_mask and labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


class EVANotConverged(RuntimeError):
    """EVA's components did not stabilise within `max_passes` passes over the calibration batches."""


def bounded_forward(limit: int, detail: str):
    """EVA's forward: activations only (no loss), failing after `limit` calls instead of cycling forever."""
    calls = [0]

    def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        calls[0] += 1
        if calls[0] > limit:
            raise EVANotConverged(f"eva: components not converged after {limit} forwards ({detail}); "
                                  "raise method.max_passes, lower method.tau or use more calibration data")  # fmt: skip
        return model(**without_labels(batch))

    return forward


def check_tokens(batches: list[dict[str, torch.Tensor]], config: Any) -> None:
    """Every batch must give PEFT's incremental PCA at least `rho * r` tokens, or its hooks skip forever."""
    need = round(config.r * config.eva_config.rho)
    counts = [len(token_indices(batch, config)) for batch in batches]
    if max(counts) < need:
        raise ValueError(f"eva needs >= {need} usable tokens per calibration batch (rho * r), got at most "
                         f"{max(counts)}: raise calib.seq_len / calib.batch_size, or set method.use_label_mask=false "
                         "(the prompt may fill the whole sequence)")  # fmt: skip


@torch.no_grad()
def eva_model(
    model: nn.Module, config: Any, batches: list[dict[str, torch.Tensor]], max_passes: int = 50
) -> nn.Module:
    """PEFT model with `init_lora_weights="eva"` whose A's are EVA's components on `batches`."""
    check_tokens(batches, config)
    peft_model = get_peft_model(model, config)
    forward = bounded_forward(
        max_passes * len(batches) + 1, f"{len(batches)} batches, tau={config.eva_config.tau}"
    )
    initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward,
                                prepare_model_inputs_fn=token_indices, show_progress_bar=False)  # fmt: skip
    return peft_model


@register
class EVA(InitMethod):
    name = "eva"
    needs = "input_cov"  # what EVA decomposes (its own incremental loop; see the module docstring)
    schema = EVAMethodConfig

    def peft_kwargs(self, cfg: Any) -> dict[str, Any]:
        return {"init_lora_weights": "eva", "eva_config": eva_config(cfg)}

    def build(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, BuildReport]:
        """PEFT's EVA loop on the calibration batches (timed by `astra.build.build_trainable`)."""
        report, config = BuildReport(), lora_config(self, ctx)
        targets = target_linears(model, config)
        peft_model = eva_model(model, config, calibration(ctx, self), ctx.cfg.method.max_passes)
        for name, layer in wrapped_layers(peft_model, targets).items():
            report.layers[name] = {"rank": layer.r["default"], "scaling": layer.scaling["default"]}
        return peft_model, report
