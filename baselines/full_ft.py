"""Full fine-tuning: every parameter of the model trains; no adapter (`astra.build` unfreezes the model)."""

from __future__ import annotations

from astra.methods import InitMethod, register


@register
class FullFineTuning(InitMethod):
    name = "full_ft"
    trains_adapters = False
