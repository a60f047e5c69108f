"""LoRA (Hu et al., 2021, arXiv 2106.09685): PEFT's default init, A ~ Kaiming-uniform, B = 0."""

from astra.methods import InitMethod, register


@register
class LoRA(InitMethod):
    name = "lora"
