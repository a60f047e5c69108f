"""Full fine-tuning: every parameter of the model trains; no adapter."""

from __future__ import annotations

from torch import nn

from astra.methods import BuildContext, BuildReport, InitMethod, register


@register
class FullFineTuning(InitMethod):
    name = "full_ft"
    trains_adapters = False

    def build(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, BuildReport]:
        for param in model.parameters():
            param.requires_grad_(True)
        return model, BuildReport()
