"""Every baseline on the embedded real models: MiniLM + MRPC end to end (a couple of steps), and
SmolLM2-135M built on real calibration text with its function preserved at init."""

from __future__ import annotations

import copy

import pytest
import torch

from astra.build import build_trainable
from astra.methods import BuildContext, get_method
from tests.conftest import requires_data
from tests.test_baselines import ADAPTERS, ALL_METHODS

pytestmark = [pytest.mark.integration, requires_data]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_minilm_mrpc_end_to_end(compose, method: str) -> None:
    from astra.pipeline import run_experiment

    cfg = compose(["model=minilm", "task=glue/mrpc", f"method={method}", "trainer.max_steps=2",
                   "trainer.batch_size=8", "task.train_limit=32", "eval.limit=32", "calib.n=8"])  # fmt: skip
    result = run_experiment(cfg)
    info = result.train_info
    assert result.run_info.status == "success"
    assert info.step0_loss == pytest.approx(info.base_loss, abs=1e-4)  # every method preserves the function
    assert all(r["loss"] == r["loss"] for r in info.history) and len(info.history) == 2  # finite losses


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from astra.calib import calibration_batches
    from astra.data import build_task
    from astra.models import load_model
    from astra.pipeline import compose_config

    cfg = compose_config(["model=smollm2-135m", "task=metamath", "calib.n=4", "calib.seq_len=256",
                          "method.target_modules=[q_proj,v_proj]"])  # fmt: skip
    model, tokenizer, _ = load_model(cfg.model, cfg.task, cfg.paths.cache_dir)
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir)
    return model.eval(), calibration_batches(task, cfg.calib)


@pytest.mark.parametrize("method", ADAPTERS)
def test_smollm2_built_with_function_preserved(compose, smollm2, method: str) -> None:
    base, batches = smollm2
    cfg = compose(["model=smollm2-135m", "task=metamath", f"method={method}",
                   "method.target_modules=[q_proj,v_proj]"])  # fmt: skip
    ctx = BuildContext(cfg=cfg, calib_batches=lambda: batches, task_type="CAUSAL_LM", model_id="smollm2")
    model, report = build_trainable(copy.deepcopy(base), get_method(method), ctx)
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        before, after = base(**inputs).logits, model.eval()(**inputs).logits
    torch.testing.assert_close(after, before, atol=2e-3, rtol=0)  # 30 layers of fp32 rounding
    assert len(report.layers) == 60  # every adapted layer is reported: 30 blocks x (q, v)
