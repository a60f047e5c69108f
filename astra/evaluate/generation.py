"""Batched greedy generation with left padding (decoder-only models, PEFT-wrapped or not).

Prompts are tokenised once and sorted by token length (longest first) so each batch pads little,
generated in batches of `batch_size` with a progress bar (samples/s), cut at the first stop string,
and returned in the input order. Greedy unless `num_samples > 1` (pass@k needs sampling).

Speed (SmolLM2-135M on CPU, see docs/performance.md): LoRA adapters are merged into the base
weights for the duration of the call (W + s B A, the same function; the exact weights are restored
afterwards), which removes two extra matmuls and PEFT's per-layer Python work from every step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
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

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


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


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PEFT LoRA-family layers of `model` (LoRA, DoRA, and the inits that reuse them), in module order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def merged_adapters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` with its active LoRA adapters merged into the base weights inside the block.

    The merged layer computes (W + s B A) x instead of W x + s B (A x): the same function, rounded
    differently (tests check that greedy outputs do not change). The base weights are restored
    from a copy on exit, bit for bit (PEFT's `unmerge` subtracts the delta again, which is not exact),
    so periodic evaluation during training leaves the training state untouched. Costs one copy of
    the adapted layers' weights while inside. A model with no LoRA layer, or already merged, is left as is.
    """
    layers = [m for m in lora_layers(model) if not m.merged and m.active_adapters]
    saved: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            saved.append((layer, {k: v.detach().clone() for k, v in base.named_parameters(recurse=False)}))
            layer.merge()
        yield model
    finally:
        for layer, params in saved:
            base = layer.get_base_layer()
            for key, value in params.items():
                getattr(base, key).data = value  # the untouched original tensor, not W + dW - dW
            layer.merged_adapters.clear()
            getattr(layer, "_caches", {}).clear()  # DoRA keeps the merged weight norm here for unmerge


def token_length_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by token length, longest first (stable), so a batch's rows pad little."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


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
    merge: bool = True,
    progress: str | None = "generate",
) -> list[list[str]]:
    """`num_samples` continuations of every prompt, `[prompt][sample]`, without the prompt text.

    Greedy when `num_samples == 1`; otherwise nucleus sampling with `temperature` and `top_p`
    (the usual pass@k setting). Token ids: the prompt batch is (batch, prompt_len) left-padded, the
    output (batch * num_samples, prompt_len + new) of which the last `new` columns are generated.
    `merge`: fold LoRA adapters into the weights for the call (see `merged_adapters`); `progress`:
    the progress bar's label, None for no bar.
    """
    stats = stats or GenerationStats()
    device = model_device(model)
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    order = token_length_order([len(ids) for ids in encoded])
    outputs: dict[int, list[str]] = {}
    sampling = num_samples > 1
    kwargs = dict(do_sample=sampling, temperature=temperature if sampling else None,
                  top_p=top_p if sampling else None, top_k=None)  # fmt: skip
    if stop:  # finished rows stop early; the text is cut again below (a stop string may span tokens)
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    start, made = time.perf_counter(), 0
    bar = tqdm(total=len(prompts), desc=progress, unit="sample", disable=progress is None, leave=False)
    with left_padding(tokenizer), eval_mode(model), merged_adapters(model) if merge else _nothing(model):
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
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
            made += int((new != tokenizer.pad_token_id).sum())
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                outputs[i] = [cut_at_stop(t, stop) for t in texts[j * num_samples : (j + 1) * num_samples]]
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{made / (time.perf_counter() - start):.1f}", refresh=False)
    bar.close()
    stats.new_tokens += made
    stats.seconds += time.perf_counter() - start
    stats.n_prompts += len(prompts)
    stats.n_sequences += len(prompts) * num_samples
    return [outputs[i] for i in range(len(prompts))]


@contextmanager
def _nothing(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    yield model
