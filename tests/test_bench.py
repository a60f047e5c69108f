"""The benchmarks' noise-free evidence: a traced step sees the work (ops, shapes, FLOPs), never the values."""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from experiments.bench_train import calls_differing, trace_step


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapter_step(use_dora: bool = False, init_b: bool = False):
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=use_dora))
    if init_b:  # another init: other values in the same modules (what PiSSA, Astra, ... do)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_()
    x = torch.randn(5, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> float:
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # the optimiser's state exists before the traced step, as in the bench
    return step


def test_trace_sees_the_same_work_for_another_init():
    calls, flops = trace_step(adapter_step())
    other_calls, other_flops = trace_step(adapter_step(init_b=True))
    assert calls_differing(calls, other_calls) == 0 and calls == other_calls
    assert flops == other_flops > 0


def test_trace_sees_dora_extra_work():
    calls, flops = trace_step(adapter_step())
    dora_calls, dora_flops = trace_step(adapter_step(use_dora=True))
    assert calls_differing(dora_calls, calls) > 0
    assert dora_flops > flops


def test_bench_init_variants_change_only_what_they_name():
    from experiments.bench_init import PRESETS, PROCEDURES, procedure_settings

    plain = {p: procedure_settings(p) for p in PRESETS}
    assert {p: s[2:] for p, s in plain.items()} == dict.fromkeys(PRESETS, ("none", "fp32"))
    expected = {
        "disk": ("fp32", "disk", "fp32"),
        "fp64eig": ("fp32", "none", "fp64"),
        "fp64": ("fp64", "none", "fp64"),
    }
    for procedure in PROCEDURES:
        preset, _, variant = procedure.partition("+")
        if preset not in PRESETS or not variant:
            continue
        options, select, offload, eig_dtype = procedure_settings(procedure)
        assert (options.accum_dtype, offload, eig_dtype) == expected[variant], procedure
        assert select == plain[preset][1]
        assert {**options.__dict__, "accum_dtype": "fp32"} == plain[preset][0].__dict__, procedure
