"""Calibration set: N examples drawn with a seed, formatted, tokenised and collated into batches.

Data-driven inits (Astra, LoRA-GA, CorDA, EVA) run the frozen model on these batches. Every batch
holds `input_ids`, `attention_mask` (plus `token_type_ids` for BERT-style tokenizers) and
`labels`, so gradient-based methods can compute a loss:

- sequence classification (GLUE): `labels` (batch,) = the examples' class ids (or floats, STS-B);
- causal LM: `labels` (batch, seq) = `input_ids` with -100 on padding, and on the prompt when
  `task.calibration_text` returns a `(prompt, response)` pair (as the release masks the user prompt).
  Labels are *not* shifted: Hugging Face causal-LM heads shift them internally.

Where the examples come from: `task.train_examples` (sampled with `calib.seed`, like the release's
`random.seed(seed); random.sample(range(len(data)), n)`) or `calib.path`, a user's own file: JSONL
(one JSON object a line, field `text` or the task's own fields) or plain text (one example a line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("astra.calib")

FORMATS = ("train_prompt", "code_release", "text")
PADDINGS = ("longest", "max_length")
IGNORE_INDEX = -100  # Hugging Face loss ignore index

Example = dict[str, Any]
Text = str | tuple[str, ...]


def validate(cfg: Any) -> None:
    """Raise a clear error for an invalid calibration option."""
    if cfg.format not in FORMATS:
        raise ValueError(f"calib.format={cfg.format!r}; valid: {', '.join(FORMATS)}")
    padding = cfg.get("padding", "longest")
    if padding not in PADDINGS:
        raise ValueError(f"calib.padding={padding!r}; valid: {', '.join(PADDINGS)}")
    for key in ("n", "seq_len", "batch_size"):
        if int(cfg[key]) < 1:
            raise ValueError(f"calib.{key}={cfg[key]} must be >= 1")


def read_calibration_file(path: str | Path) -> list[Example]:
    """Examples of a user's calibration file: `.jsonl`/`.json` = JSON objects, else text lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calib.path={str(path)!r}: no such file (expected JSONL or a text file)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return [{"text": line} for line in lines]
    examples = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"calib.path={str(path)!r} line {i + 1} is not JSON: {err}") from err
        if not isinstance(row, dict):
            raise ValueError(
                f"calib.path={str(path)!r} line {i + 1}: expected a JSON object, got {type(row).__name__}"
            )
        examples.append(row)
    if not examples:
        raise ValueError(f"calib.path={str(path)!r} holds no example")
    return examples


def calibration_examples(task: Any, cfg: Any) -> list[Example]:
    """`calib.n` examples drawn with `calib.seed` (all of them, with a warning, when fewer exist)."""
    pool = read_calibration_file(cfg.path) if cfg.get("path") else task.train_examples
    source = cfg.get("path") or "the task's training split"
    if len(pool) < cfg.n:
        log.warning(
            "calib.n=%d but %s holds only %d examples: calibrating on all of them", cfg.n, source, len(pool)
        )
        return list(pool)
    return [pool[i] for i in random.Random(cfg.seed).sample(range(len(pool)), cfg.n)]


def is_classification(task: Any) -> bool:
    """The task's declared head (task.head), else the GLUE family (configs without a head)."""
    head = getattr(task.cfg, "head", None)
    return str(head) == "seq_cls" if head is not None else getattr(task.cfg, "family", None) == "glue"


def example_text(task: Any, example: Example, fmt: str) -> Text:
    """The calibration text of one example; a user's `{"text": ...}` line is used verbatim."""
    if set(example) <= {"text", "label"} and "text" in example:
        return str(example["text"])
    return task.calibration_text(example, fmt)


def encode_classification(tokenizer: Any, text: Text, example: Example, seq_len: int) -> dict[str, Any]:
    """Tokenised single text or sentence pair, with the example's class label when it has one."""
    texts = (text,) if isinstance(text, str) else tuple(text)
    features = dict(tokenizer(*texts, truncation=True, max_length=seq_len))
    if "label" in example:
        features["labels"] = example["label"]
    return features


def encode_causal(tokenizer: Any, text: Text, seq_len: int) -> dict[str, Any]:
    """Tokenised `text` or `prompt + response` with token labels, -100 on the prompt."""
    if isinstance(text, str):
        prompt, full = "", text
    elif len(text) == 2:
        prompt, full = text[0], text[0] + text[1]
    else:
        raise ValueError(
            f"causal-LM calibration text must be a str or (prompt, response), got {len(text)} parts"
        )
    features = dict(tokenizer(full, truncation=True, max_length=seq_len))
    n_prompt = len(tokenizer(prompt, truncation=True, max_length=seq_len)["input_ids"]) if prompt else 0
    labels = list(features["input_ids"])
    labels[:n_prompt] = [IGNORE_INDEX] * min(n_prompt, len(labels))
    features["labels"] = labels
    return features


def collate(
    features: list[dict[str, Any]], tokenizer: Any, padding: str, seq_len: int
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples into tensors; token labels are padded with -100."""
    token_labels = (
        [f.pop("labels") for f in features] if isinstance(features[0].get("labels"), list) else None
    )
    batch = tokenizer.pad(features, padding=padding, max_length=seq_len, return_tensors="pt")
    batch = {k: v for k, v in batch.items()}
    if token_labels is not None:
        width = batch["input_ids"].shape[1]
        left = tokenizer.padding_side == "left"
        rows = [[IGNORE_INDEX] * (width - len(lab)) + lab if left else lab + [IGNORE_INDEX] * (width - len(lab))
                for lab in token_labels]  # fmt: skip
        batch["labels"] = torch.tensor(rows, dtype=torch.long)
    return batch


def drop_last_position(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's `input_ids[:-1]`: every (batch, seq) tensor loses its last position."""
    return {k: v[:, :-1] if v.dim() == 2 else v for k, v in batch.items()}


def calibration_batches(task: Any, cfg: Any) -> list[dict[str, torch.Tensor]]:
    """Collated calibration batches of `calib.batch_size` examples (`calib.n` in all).

    Each batch: `input_ids`, `attention_mask` (batch, seq) [, `token_type_ids`] and `labels`
    ((batch,) class ids for classification, (batch, seq) token labels for causal LM).
    """
    validate(cfg)
    examples = calibration_examples(task, cfg)
    tokenizer, classify = task.tokenizer, is_classification(task)
    encoded = []
    for ex in examples:
        text = example_text(task, ex, cfg.format)
        if classify:
            encoded.append(encode_classification(tokenizer, text, ex, cfg.seq_len))
        else:
            encoded.append(encode_causal(tokenizer, text, cfg.seq_len))
    if classify and any("labels" not in f for f in encoded):
        log.warning("calibration examples without a `label` field: batches carry no labels "
                    "(gradient-based inits such as LoRA-GA need them)")  # fmt: skip
        encoded = [{k: v for k, v in f.items() if k != "labels"} for f in encoded]
    padding = cfg.get("padding", "longest")
    batches = []
    for start in range(0, len(encoded), cfg.batch_size):
        batch = collate(encoded[start : start + cfg.batch_size], tokenizer, padding, cfg.seq_len)
        batches.append(drop_last_position(batch) if cfg.get("drop_last_token", False) else batch)
    return batches


def batches_digest(batches: list[dict[str, torch.Tensor]]) -> str:
    """sha256 of the calibration tensors (what the model really sees), for content-keyed caches."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            tensor = batch[key].contiguous().cpu()
            h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def count_tokens(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(real tokens, all positions including padding) over the calibration set."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return real, total
