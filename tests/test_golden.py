"""Golden losses: a few optimisation steps of LoRA and Astra on the tiny models, pinned.

The whole pipeline runs (compose, tiny data, committed tokenizer, seeded random model, calibration,
statistics, init, the shared trainer), so any change to what a run computes -- data order, tokenisation,
prompt, init, loss, optimiser, schedule -- moves these numbers and fails here; a refactor that claims to
change nothing must leave them alone.

Deterministic CPU settings: one thread, deterministic algorithms, fp32, fixed seeds. Tolerance: relative
2e-4 (and 1e-6 absolute). Re-ordering of fp32 reductions between CPU instruction sets (AVX2 vs
AVX-512) changes a loss by ~1e-6 relative, and three small steps amplify that little; any real change to
the computation moves the losses by far more.

When a change is intended, re-record and say why in the commit:
    ASTRA_RECORD_GOLDEN=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -s tests/test_golden.py
prints the new table (the test then fails, so a recording run is never mistaken for a pass).
"""

from __future__ import annotations

import os

import pytest
import torch

RTOL, ATOL = 2e-4, 1e-6
STEPS = 4
BERT = ["model=tiny-bert", "task=glue/mrpc", "task.train_limit=32", "trainer.batch_size=8", "eval.limit=8"]
LLAMA = ["model=tiny-llama", "task=metamath", "task.train_source=local", "task.train_limit=12", "task.max_length=128",
         "task.eval_sets=[gsm8k]", "trainer.batch_size=4", "eval.limit=1", "task.max_new_tokens=4"]  # fmt: skip
COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.lr=1e-2",
    "trainer.warmup_ratio=0",
    "trainer.scheduler=constant",
    "calib.n=8",
    "calib.seq_len=64",
    "seed=0",
]
CASES = {
    "tiny-bert/lora": [*BERT, "method=lora"],
    "tiny-bert/astra": [*BERT, "method=astra"],
    "tiny-llama/lora": [*LLAMA, "method=lora"],
    "tiny-llama/astra": [*LLAMA, "method=astra"],
}
# case -> (loss before training, training loss at steps 1..STEPS); recorded with ASTRA_RECORD_GOLDEN=1
GOLDEN: dict[str, tuple[float, list[float]]] = {
    "tiny-bert/astra": (
        0.6850394010543823,
        [0.6918758153915405, 0.679690420627594, 0.6543554663658142, 0.6283631324768066],
    ),
    "tiny-bert/lora": (
        0.6850394010543823,
        [0.6918758153915405, 0.6801491975784302, 0.6570258140563965, 0.6306971907615662],
    ),
    "tiny-llama/astra": (
        7.639751434326172,
        [7.636155605316162, 7.622160911560059, 7.631299018859863, 7.580453395843506],
    ),
    "tiny-llama/lora": (
        7.639751434326172,
        [7.636155605316162, 7.63052225112915, 7.624026298522949, 7.595757007598877],
    ),
}


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def losses(compose, overrides: list[str]) -> tuple[float, list[float]]:
    from astra.pipeline import run_experiment

    result = run_experiment(compose([*overrides, *COMMON]))
    assert result is not None and result.run_info.status == "success", result and result.run_info.error
    info = result.train_info
    assert [row["step"] for row in info.history] == list(range(1, STEPS + 1))
    # function preserved at init: training starts from the base model's loss, for both methods
    assert info.step0_loss == pytest.approx(info.base_loss, abs=1e-4)
    return info.base_loss, [row["loss"] for row in info.history]


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_losses(compose, deterministic, case):
    base, steps = losses(compose, CASES[case])
    if os.environ.get("ASTRA_RECORD_GOLDEN"):
        print(f"\n    {case!r}: ({base!r}, {steps!r}),")
        pytest.fail("recording run: paste the line above into GOLDEN")
    want_base, want_steps = GOLDEN[case]
    assert base == pytest.approx(want_base, rel=RTOL, abs=ATOL)
    assert steps == pytest.approx(want_steps, rel=RTOL, abs=ATOL)


def test_lora_and_astra_differ_after_training():
    """The pins tell the methods apart: the final losses of LoRA and Astra lie outside each other's
    tolerance band on both models, so the test would notice one method silently running as the other."""
    for model in ("tiny-bert", "tiny-llama"):
        (lora_base, lora), (astra_base, astra) = GOLDEN[f"{model}/lora"], GOLDEN[f"{model}/astra"]
        assert (
            lora_base == astra_base and lora[0] == astra[0]
        )  # same seeded model and batch, both preserve it
        assert abs(lora[-1] - astra[-1]) > 2 * (RTOL * abs(lora[-1]) + ATOL)
