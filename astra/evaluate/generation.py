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
from collections.abc import Callable, Iterator, Sequence
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


# generation_config fields that add a logits processor or a stopping rule under greedy decoding; the lean
# loop below implements none of them, so a model that sets any keeps `model.generate`.
GREEDY_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "max_time": None, "renormalize_logits": False, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
}  # fmt: skip


def lean_greedy_applies(model: torch.nn.Module) -> bool:
    """The lean greedy loop reproduces `model.generate` here: a plain-head decoder without logits processors."""
    from astra.trainer import PLAIN_HEAD_MODEL_TYPES, unwrap_peft

    base = unwrap_peft(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return False
    gc = getattr(base, "generation_config", None)
    return gc is None or all(getattr(gc, k, d) in (d, None) for k, d in GREEDY_PROCESSOR_FIELDS.items())


@torch.inference_mode()  # no autograd bookkeeping at all: measured 48 vs 59 ms/token at batch 1 (SmolLM2)
def greedy_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    stopped: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(batch, new) greedy tokens after left-padded prompts (batch, prompt_len); pad after a row ends.

    What `model.generate(do_sample=False)` computes, without its per-step machinery (logits processors,
    stopping-criteria objects, input preparation): one prefill that applies the LM head to the last
    position only, then one single-token forward per step on a KV cache, with the position ids and
    attention mask `generate` uses (positions count the prompt's real tokens). A row ends at EOS, or
    when `stopped(tokens so far) -> (batch,) bool` says so (stop strings); the loop ends when all have.
    """
    from transformers import DynamicCache

    from astra.trainer import unwrap_peft

    base = unwrap_peft(model)  # adapters live inside; skips PEFT's wrapper forward
    cache = DynamicCache(config=base.config)
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = base(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
               logits_to_keep=1)  # fmt: skip
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].float().argmax(-1)  # (batch,)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if stopped is not None:
            finished |= stopped(torch.stack(tokens, 1))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = base(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True)  # fmt: skip
    return torch.stack(tokens, 1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)


def stop_string_check(tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> Callable:
    """`stopped(tokens (batch, new)) -> (batch,) bool`: the decoded text of the row contains a stop string.

    The text is cut at the first stop string afterwards, so ending a row there changes nothing. Only the
    last `window` tokens are decoded (a stop string of n characters spans at most n tokens; checked every
    step, a stop string is seen in the step its last token arrives), so the check costs O(1) per step.
    """
    window = max(len(s) for s in stop) + 1

    def stopped(tokens: torch.Tensor) -> torch.Tensor:
        texts = tokenizer.batch_decode(tokens[:, -window:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stop) for t in texts], device=tokens.device)

    return stopped


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
    lean: bool = True,
) -> list[list[str]]:
    """`num_samples` continuations of every prompt, `[prompt][sample]`, without the prompt text.

    Greedy when `num_samples == 1`; otherwise nucleus sampling with `temperature` and `top_p`
    (the usual pass@k setting). Token ids: the prompt batch is (batch, prompt_len) left-padded, the
    output (batch * num_samples, prompt_len + new) of which the last `new` columns are generated.
    `merge`: fold LoRA adapters into the weights for the call (see `merged_adapters`); `lean`: greedy
    decoding by `greedy_tokens` where it reproduces `model.generate` (else `model.generate`);
    `progress`: the progress bar's label, None for no bar.
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
    lean = lean and not sampling and lean_greedy_applies(model)
    stopped = stop_string_check(tokenizer, stop) if stop else None
    start, made = time.perf_counter(), 0
    bar = tqdm(total=len(prompts), desc=progress, unit="sample", disable=progress is None, leave=False)
    with left_padding(tokenizer), eval_mode(model), merged_adapters(model) if merge else _nothing(model):
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            if lean:
                new = greedy_tokens(model, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                    tokenizer.eos_token_id, tokenizer.pad_token_id, stopped)  # fmt: skip
            else:
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
