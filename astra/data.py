"""Tasks: data loading (local files under `paths.data_dir`, else the Hub), encoding, evaluation.

A task family (`task.family`) is a `Task` subclass registered in `TASK_FAMILIES`. The GLUE family
lives here; the NLG families (math, code, commonsense) register themselves from `astra.nlg`. A task
declares its model head (`task.head`) and its metrics with kind and direction (`task.metrics`); the
family adds the bookkeeping metrics its code always reports (`builtin_metrics`: counts, throughput).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from astra.common import sha256_file
from astra.config import MetricSpec
from astra.evaluate.metrics import compute_metrics
from astra.models import eval_mode, model_device
from astra.results import MetricKind, metric_specs

Example = dict[str, Any]


class MissingDataError(FileNotFoundError):
    """A dataset is neither in the data dir nor reachable on the Hub."""


class DataFileError(ValueError):
    """A data file that cannot be read as the task expects; the message names the file and the line."""


class Task:
    """One task: its examples, how an example becomes training features, and how to evaluate."""

    builtin_metrics: tuple[MetricSpec, ...] = ()  # reported by the family's code whatever the task declares

    def __init__(self, cfg: Any, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path, seed: int = 0):
        self.cfg, self.tokenizer, self.data_dir, self.seed = cfg, tokenizer, Path(data_dir), seed
        self.data_files: dict[str, str] = {}  # path -> sha256 of every file read
        self.dataset_used = ""  # what was really read (file path or Hub id), for the results JSON

    # --- to implement -------------------------------------------------------------------------
    def load_split(self, split: str) -> list[Example]:
        raise NotImplementedError

    def encode(self, example: Example) -> dict[str, Any]:
        """Training features of one example (input_ids, attention_mask, labels, ...)."""
        raise NotImplementedError

    def calibration_text(self, example: Example, fmt: str) -> str | tuple[str, str]:
        """The text the calibration forward sees for `calib.format=fmt`."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        raise NotImplementedError

    def collator(self) -> Callable:
        return DataCollatorWithPadding(self.tokenizer)

    def check_eval(self, eval_cfg: Any) -> None:
        """Raise before training when `evaluate` would refuse `eval_cfg` (so no training is lost)."""

    # --- shared -------------------------------------------------------------------------------
    def metric_specs(self, metrics: dict[str, float]) -> dict[str, dict[str, Any]]:
        """{name: {kind, higher_is_better}} of each reported metric; raises on an undeclared one."""
        return metric_specs(metrics, [*self.cfg.metrics, *self.builtin_metrics])

    def record_file(self, path: Path) -> None:
        self.data_files[str(path)] = sha256_file(path)
        self.dataset_used = self.dataset_used or str(path.parent)

    @cached_property
    def train_examples(self) -> list[Example]:
        """Training split, shuffled with the run seed and cut to `task.train_limit`."""
        examples = self.load_split("train")
        random.Random(self.seed).shuffle(examples)
        return examples[: self.cfg.train_limit] if self.cfg.train_limit else examples

    @cached_property
    def train_dataset(self) -> list[dict[str, Any]]:
        return [self.encode(ex) for ex in self.train_examples]


TASK_FAMILIES: dict[str, type[Task]] = {}


def register_family(name: str) -> Callable[[type[Task]], type[Task]]:
    def wrap(cls: type[Task]) -> type[Task]:
        TASK_FAMILIES[name] = cls
        return cls

    return wrap


def build_task(cfg: Any, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path, seed: int = 0) -> Task:
    if cfg.family not in TASK_FAMILIES:
        raise ValueError(f"task.family={cfg.family!r}; valid: {', '.join(sorted(TASK_FAMILIES))}")
    return TASK_FAMILIES[cfg.family](cfg, tokenizer, data_dir, seed)


def read_tsv(path: Path, header: bool, columns: Sequence[str]) -> list[Example]:
    """GLUE TSV: quoting disabled (fields hold unbalanced quotes), BOM tolerated (MRPC). Each row carries
    its 1-based line number under `_line`; an empty file or a header without rows raises DataFileError
    naming the file (a row missing a column the task reads fails in `GlueTask`, naming the line)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataFileError(f"{path}: not a UTF-8 TSV file ({err})") from err
    numbered = [(i, row) for i, row in enumerate(rows, start=1) if row]  # QUOTE_NONE: one row per line
    if not numbered:
        raise DataFileError(f"{path}: empty file")
    names = numbered.pop(0)[1] if header else list(columns)
    if not numbered:
        raise DataFileError(f"{path}: only a header line, no examples")
    return [{**dict(zip(names, row, strict=False)), "_line": line} for line, row in numbered]


def hub_split(hub_id: str, config: str, split: str, expected: Path) -> list[Example]:
    """A split from the Hub, or a `MissingDataError` naming both places tried."""
    try:
        from datasets import load_dataset

        return [dict(row) for row in load_dataset(hub_id, config, split=split)]
    except Exception as err:  # offline, unknown id, ...: say where we looked
        raise MissingDataError(
            f"dataset file not found: {expected}\n"
            f"  and the Hub dataset {hub_id!r} (config {config!r}, split {split!r}) could not be loaded: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            f"  Set ASTRA_DATA_DIR (or paths.data_dir) to a folder laid out like ../shared/data."
        ) from err


@register_family("glue")
class GlueTask(Task):
    """GLUE sentence(-pair) classification or regression (STS-B) with a sequence-classification head."""

    builtin_metrics = (MetricSpec("n_eval", MetricKind.count),)

    def load_split(self, split: str) -> list[Example]:
        cfg = self.cfg
        stem = cfg.dev_split if split == "dev" else split
        path = self.data_dir / "glue" / cfg.glue_name / f"{stem}.tsv"
        if path.exists():
            self.record_file(path)
            rows = read_tsv(path, cfg.header, cfg.columns)
            return [self._normalise_line(path, row) for row in rows]
        hub_split_name = cfg.hub_dev_split if split == "dev" else split
        rows = hub_split(cfg.hub_id, cfg.glue_name, hub_split_name, path)
        self.dataset_used = self.dataset_used or f"hub:{cfg.hub_id}/{cfg.glue_name}"
        return [
            self._normalise(row, cfg.hub_text_fields or cfg.text_fields, cfg.hub_label_field) for row in rows
        ]

    def _normalise_line(self, path: Path, row: Example) -> Example:
        """`_normalise` of one TSV row; any error names the file, line and column."""
        try:
            example = self._normalise(row, self.cfg.text_fields, self.cfg.label_field)
        except KeyError as err:
            columns = len(row) - 1  # without `_line`
            raise DataFileError(
                f"{path}:{row['_line']}: no value for column {err} ({columns} columns)"
            ) from err
        except ValueError as err:
            raise DataFileError(f"{path}:{row['_line']}: column {self.cfg.label_field!r}: {err}") from err
        return example

    def _normalise(self, row: Example, text_fields: list[str], label_field: str) -> Example:
        """Texts under the TSV's `text_fields` names and a numeric `label` (class id, or float)."""
        label = row[label_field]
        if self.cfg.num_labels == 1:
            value: float | int = float(label)
        elif isinstance(label, str) and self.cfg.label_names and not label.lstrip("-").isdigit():
            value = self.cfg.label_names.index(label)
        else:
            value = int(label)
        if self.cfg.num_labels > 1 and not 0 <= value < self.cfg.num_labels:
            raise ValueError(f"label {label!r} outside the task's label set 0..{self.cfg.num_labels - 1}")
        texts = {name: row[src] for name, src in zip(self.cfg.text_fields, text_fields, strict=True)}
        return {**texts, "label": value}

    def texts(self, example: Example) -> tuple[str, ...]:
        return tuple(example[f] for f in self.cfg.text_fields)

    def encode(self, example: Example) -> dict[str, Any]:
        features = self.tokenizer(*self.texts(example), truncation=True, max_length=self.cfg.max_length)
        return {**features, "labels": example["label"]}

    def calibration_text(self, example: Example, fmt: str) -> str | tuple[str, ...]:
        texts = self.texts(example)
        return texts if fmt == "train_prompt" else " ".join(texts)

    @cached_property
    def eval_examples(self) -> list[Example]:
        return self.load_split("dev")

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, examples: list[Example], batch_size: int) -> np.ndarray:
        device = model_device(model)
        loader = DataLoader(
            [self.encode(e) for e in examples], batch_size=batch_size, collate_fn=self.collator()
        )
        outputs = []
        with eval_mode(model):
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                logits = model(**batch).logits.float()
                outputs.append(logits[:, 0] if self.cfg.num_labels == 1 else logits.argmax(-1))
        return torch.cat(outputs).cpu().numpy()

    def evaluate(self, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        examples = self.eval_examples[: eval_cfg.limit] if eval_cfg.limit else self.eval_examples
        predictions = self.predict(model, examples, eval_cfg.batch_size)
        names = [spec.name for spec in self.cfg.metrics]
        metrics = compute_metrics(names, predictions, [e["label"] for e in examples])
        metrics["n_eval"] = len(examples)
        return metrics
