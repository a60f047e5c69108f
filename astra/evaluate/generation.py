"""Batched greedy generation with left padding (decoder-only models, PEFT-wrapped or not).

Prompts are sorted by length so each batch pads little, generated in batches of `batch_size`, cut
at the first stop string, and returned in the input order. Greedy unless `do_sample` (pass@k with
n > 1 samples needs sampling).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from astra.models import eval_mode, model_device


@dataclass
class GenerationStats:
    n_prompts: int = 0
    n_sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.n_sequences / self.seconds if self.seconds else 0.0


@contextmanager
def left_padding(tokenizer: PreTrainedTokenizerBase):
    """Decoder-only generation needs the prompt flush against the first generated token."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    num_samples: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    stats: GenerationStats | None = None,
) -> list[list[str]]:
    """`num_samples` continuations of every prompt, `[prompt][sample]`, without the prompt text.

    Greedy when `num_samples == 1`; otherwise nucleus sampling with `temperature` and `top_p`
    (the usual pass@k setting). Token ids: the prompt batch is (batch, prompt_len) left-padded, the
    output (batch * num_samples, prompt_len + new) of which the last `new` columns are generated.
    """
    stats = stats or GenerationStats()
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: dict[int, list[str]] = {}
    sampling = num_samples > 1
    kwargs = dict(do_sample=sampling, temperature=temperature if sampling else None,
                  top_p=top_p if sampling else None, top_k=None)  # fmt: skip
    if stop:  # finished rows stop early; the text is cut again below (a stop string may span tokens)
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    start = time.perf_counter()
    with left_padding(tokenizer), eval_mode(model):
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = tokenizer(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=True
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            new = out[:, batch["input_ids"].shape[1] :]  # (batch * num_samples, new)
            stats.new_tokens += int((new != tokenizer.pad_token_id).sum())
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                outputs[i] = [cut_at_stop(t, stop) for t in texts[j * num_samples : (j + 1) * num_samples]]
    stats.seconds += time.perf_counter() - start
    stats.n_prompts += len(prompts)
    stats.n_sequences += len(prompts) * num_samples
    return [outputs[i] for i in range(len(prompts))]
