"""Forgetting probe (astra/forgetting.py): held-out loss equals a direct shifted cross-entropy, an
unchanged model forgets nothing, a changed one forgets exactly its loss change; every NLG run reports it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from astra import forgetting as fg
from astra.data import read_tsv
from astra.pipeline import REPO_ROOT, run_experiment
from astra.results import MetricKind
from tests.conftest import DATA_DIR, requires_data

pytestmark = requires_data


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(REPO_ROOT / "tests/assets/tokenizers/tiny-llama"))


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def direct_loss(model, tokenizer, texts: list[str]) -> float:
    """Each sentence alone, unpadded: sum over t of CE(logits[t], token[t+1]) / number of predictions."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor(
            [tokenizer(text, truncation=True, max_length=fg.MAX_TOKENS)["input_ids"]]
        )  # (1, n)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # (n, vocab)
        total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def test_heldout_sentences_are_first_distinct_qnli_dev_sentences():
    texts, files = fg.heldout_sentences(DATA_DIR, n=5)
    rows = read_tsv(DATA_DIR / fg.SOURCE, header=True, columns=())
    expected = list(dict.fromkeys(r["sentence"].strip() for r in rows))[:5]
    assert texts == expected and len(set(texts)) == len(texts) == 5
    assert list(files) == [str(DATA_DIR / fg.SOURCE)]


def test_loss_equals_direct_shifted_cross_entropy(model, tokenizer):
    texts, _ = fg.heldout_sentences(DATA_DIR, n=7)
    batches = fg.heldout_batches(tokenizer, texts, batch_size=3)  # padded batches of unequal lengths
    loss, tokens = fg.mean_token_loss(model, batches)
    assert loss == pytest.approx(direct_loss(model, tokenizer, texts), rel=1e-5)
    assert tokens == sum(
        len(tokenizer(t, truncation=True, max_length=fg.MAX_TOKENS)["input_ids"]) - 1 for t in texts
    )


def test_unchanged_model_forgets_nothing_changed_model_its_loss_change(model, tokenizer):
    probe = fg.ForgettingProbe.measure(model, tokenizer, DATA_DIR)
    unchanged = probe.after(model)
    assert unchanged[fg.METRIC] == 0.0 and unchanged["forgetting/loss_after"] == probe.loss_before
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    changed = probe.after(model)
    texts, _ = fg.heldout_sentences(DATA_DIR)
    assert changed["forgetting/loss_after"] == pytest.approx(direct_loss(model, tokenizer, texts), rel=1e-5)
    assert changed[fg.METRIC] == pytest.approx(changed["forgetting/loss_after"] - probe.loss_before)
    assert changed[fg.METRIC] != 0.0


def test_metric_specs_are_losses_lower_is_better():
    metrics = {name: 0.0 for name in fg.METRICS}
    specs = fg.metric_specs(metrics)
    assert specs[fg.METRIC] == {"kind": str(MetricKind.loss), "higher_is_better": False}
    assert specs["forgetting/tokens"]["kind"] == "count"
    assert set(specs) == set(metrics) and fg.metric_specs({"accuracy": 1.0}) == {}


def test_nlg_run_reports_forgetting_glue_run_does_not(compose):
    nlg = run_experiment(compose(["debug=tiny_llama", "method=lora"]))
    metrics, specs = nlg.eval_info.metrics, nlg.eval_info.metric_specs
    assert set(fg.METRICS) <= set(metrics) and specs["forgetting"]["higher_is_better"] is False
    assert metrics["forgetting"] == pytest.approx(
        metrics["forgetting/loss_after"] - metrics["forgetting/loss_before"]
    )
    assert any(p.endswith("qnli/dev.tsv") for p in nlg.meta_info.data_files)
    glue = run_experiment(compose(["debug=tiny", "method=lora"]))
    assert "forgetting" not in glue.eval_info.metrics
