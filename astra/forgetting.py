"""Forgetting (beyond the paper): how much fine-tuning raised the model's loss on unrelated general text.

As in PEFT's MetaMathQA benchmark (huggingface/peft PR #2925, fixed in #3419): the mean next-token
cross-entropy of the model on a small held-out general-text set AFTER training minus that of the BASE
model before any adapter or init (labels shifted by one token, every real token of the text predicted).
Lower is better; 0 = nothing forgotten; the maintainers found Astra 0.230 vs LoRA 0.050 (Llama-3.2-3B).

Text: PEFT reads a sample of finewiki (Wikipedia). Offline we have no Wikipedia dump, but the GLUE
QNLI dev sentences (`${data_dir}/glue/qnli/dev.tsv`, column `sentence`) are Wikipedia sentences (SQuAD
contexts), unrelated to math or code: the set is the first `NUM_SENTENCES` distinct sentences in file
order, each cut to `MAX_TOKENS` tokens. Fixed in code (not a config field) so every run measures the
same text; change `VERSION` with any change to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from astra.common import IGNORE_INDEX, sha256_file
from astra.data import MissingDataError, hub_split, read_tsv
from astra.models import eval_mode, model_device
from astra.results import MetricKind

log = logging.getLogger("astra.forgetting")
VERSION = 1
SOURCE = Path("glue/qnli/dev.tsv")  # under paths.data_dir; Hub fallback nyu-mll/glue qnli validation
NUM_SENTENCES = 128  # ~4k tokens with SmolLM2's tokenizer: two forward passes of ~10 s on 2 CPU cores
MAX_TOKENS = 128
BATCH_SIZE = 8
METRIC = "forgetting"
METRICS = {  # name -> (kind, higher_is_better)
    METRIC: (MetricKind.loss, False),  # loss difference after - before
    f"{METRIC}/loss_before": (MetricKind.loss, False),
    f"{METRIC}/loss_after": (MetricKind.loss, False),
    f"{METRIC}/tokens": (MetricKind.count, True),
}


def heldout_sentences(data_dir: str | Path, n: int = NUM_SENTENCES) -> tuple[list[str], dict[str, str]]:
    """(first `n` distinct QNLI dev sentences in file order, {file: sha256} of what was read)."""
    path = Path(data_dir) / SOURCE
    if path.is_file():
        rows, files = read_tsv(path, header=True, columns=()), {str(path): sha256_file(path)}
    else:
        rows, files = hub_split("nyu-mll/glue", "qnli", "validation", path), {}
    unique = list(dict.fromkeys(r["sentence"].strip() for r in rows if r.get("sentence", "").strip()))
    return unique[:n], files


def heldout_batches(tokenizer: Any, texts: list[str], max_tokens: int = MAX_TOKENS,
                    batch_size: int = BATCH_SIZE) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Right-padded batches: input_ids, attention_mask (batch, seq) and labels = input_ids with padding
    set to IGNORE_INDEX (the shift happens in `mean_token_loss`)."""
    ids = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):
            input_ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(token-weighted mean cross-entropy of predicting token t+1 from tokens <= t, predicted tokens)."""
    device, total, count = model_device(model), 0.0, 0
    with eval_mode(model):
        for batch in batches:
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits  # (b, seq, vocab)  # fmt: skip
            targets = batch["labels"][:, 1:].to(device)  # (b, seq-1)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (b*(seq-1), vocab)
            total += F.cross_entropy(
                flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1), count


@dataclass
class ForgettingProbe:
    """Held-out loss of the base model, measured once before any init; `after` gives the metrics."""

    batches: list[dict[str, torch.Tensor]]
    loss_before: float
    tokens: int
    data_files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def measure(cls, model: torch.nn.Module, tokenizer: Any, data_dir: str | Path) -> ForgettingProbe:
        texts, files = heldout_sentences(data_dir)
        batches = heldout_batches(tokenizer, texts)
        loss, tokens = mean_token_loss(model, batches)
        return cls(batches, loss, tokens, files)

    def after(self, model: torch.nn.Module) -> dict[str, float]:
        """{forgetting, forgetting/loss_before, forgetting/loss_after, forgetting/tokens} of the trained model."""
        loss_after, _ = mean_token_loss(model, self.batches)
        return {METRIC: loss_after - self.loss_before, f"{METRIC}/loss_before": self.loss_before,
                f"{METRIC}/loss_after": loss_after, f"{METRIC}/tokens": float(self.tokens)}  # fmt: skip


def metric_specs(metrics: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The result store's {name: {kind, higher_is_better}} of the forgetting metrics in `metrics`."""
    return {
        k: {"kind": str(METRICS[k][0]), "higher_is_better": METRICS[k][1]} for k in metrics if k in METRICS
    }


def forgetting_probe(model: torch.nn.Module, tokenizer: Any, cfg: Any) -> ForgettingProbe | None:
    """The probe for a causal-LM run (None for classification, or when the text cannot be read)."""
    if str(cfg.task.head) != "causal_lm":
        return None
    try:
        probe = ForgettingProbe.measure(model, tokenizer, cfg.paths.data_dir)
    except MissingDataError as err:
        log.warning("forgetting not measured: %s", str(err).splitlines()[0])
        return None
    log.info("forgetting: base loss %.4f on %d held-out tokens", probe.loss_before, probe.tokens)
    return probe
