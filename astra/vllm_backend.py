"""`eval.backend=vllm`: generation through vLLM on the merged model (optional extra, GPU).

Same prompts (the task's prompt texts, tokenised with special tokens as the HF path does), same
decoding (greedy for one sample; temperature with top_p 0.95 and no top_k for several), same token
budget, same stop strings and the same cut (`cut_at_stop`, the stop string excluded), so the task's
answer extraction sees text produced under the HF path's rules. vLLM's kernels (batched attention,
different summation order) can still change a greedy choice between near-tied tokens, so the backend is
part of the run signature (`eval.backend`). Untested here: this machine has no GPU and no vLLM
(docs/scaleout.md says how to check it against the HF path).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from astra.evaluate.generation import GenerationStats, cut_at_stop, merged_adapters

EXTRA_HINT = "pip install .[vllm]  (or pip install 'astra-repro[vllm]'; needs a CUDA GPU)"


def require_vllm() -> Any:
    """The `vllm` module, or an ImportError naming the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"eval.backend=vllm needs the optional vLLM extra: {EXTRA_HINT}") from err
    return vllm


def save_merged(model: torch.nn.Module, tokenizer: Any, folder: Path) -> Path:
    """The model with its LoRA adapters folded in, as a plain transformers folder vLLM can load.

    Keys: PEFT's `...q_proj.base_layer.weight` become `...q_proj.weight`; `lora_*` tensors are dropped
    (they are inside the merged weights). The trained model itself is left untouched (merged_adapters)."""
    with merged_adapters(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        base.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def generate_vllm(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    num_samples: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    stats: GenerationStats | None = None,
) -> list[list[str]]:
    """`num_samples` continuations of every prompt, `[prompt][sample]`, as `astra.evaluate.generation.generate`."""
    vllm = require_vllm()
    stats = stats or GenerationStats()
    sampling = num_samples > 1
    params = vllm.SamplingParams(n=num_samples, temperature=temperature if sampling else 0.0,
                                 top_p=top_p if sampling else 1.0, top_k=-1, max_tokens=max_new_tokens,
                                 stop=list(stop) or None, seed=0)  # fmt: skip
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="astra-vllm-") as tmp:
        llm = vllm.LLM(model=str(save_merged(model, tokenizer, Path(tmp))), dtype=dtype, seed=0)
        start = time.perf_counter()
        outputs = llm.generate(list(prompts), params)
        seconds = time.perf_counter() - start
    texts = [[cut_at_stop(c.text, stop) for c in out.outputs] for out in outputs]
    stats.seconds += seconds
    stats.n_prompts += len(texts)
    stats.n_sequences += sum(len(t) for t in texts)
    stats.new_tokens += sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return texts
