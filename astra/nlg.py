"""NLG task families: math (MetaMathQA -> GSM8K, MATH), code (CodeFeedback -> HumanEval, MBPP) and
commonsense (Commonsense-170K -> eight commonsense benchmarks).

Training is instruction tuning in the Alpaca template with the loss on the response only: prompt
and response are tokenised separately and concatenated (`prompt_ids + response_ids + [eos]`), so
the label mask is exact, and cut to `task.max_length` (512, as MetaMath / PiSSA).

The training set is the paper's Hub dataset when it can be loaded (`task.train_source=auto|hub`),
else the staged local substitute (`task.local_train`), and `dataset_used` says which, verbatim. The
evaluation sets are read from `paths.data_dir` (layout of ../shared/data), else from the Hub.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq

from astra import prompts
from astra.common import IGNORE_INDEX
from astra.config import MetricSpec
from astra.data import DataFileError, Example, MissingDataError, Task, hub_split, register_family
from astra.evaluate import commonsense as cs
from astra.evaluate.code_eval import score_completions
from astra.evaluate.generation import GenerationStats, generate
from astra.evaluate.math_eval import (
    gsm8k_correct,
    gsm8k_gold,
    gsm8k_prediction,
    gsm8k_to_metamath,
    math_correct,
    math_prediction,
)
from astra.results import MetricKind

log = logging.getLogger("astra.nlg")
METAMATH_STOP = ("Instruction:", "Instruction", "Response:", "Response")  # MetaMath eval_gsm8k.py
CODE_STOP = ("### Instruction", "\n\n\n\n")
COMMONSENSE_STOP = ("### Instruction",)

# evaluation set -> (file under data_dir, Hub id, Hub config, Hub split)
EVAL_SOURCES: dict[str, tuple[str, str, str | None, str]] = {
    "gsm8k": ("gsm8k/test.jsonl", "openai/gsm8k", "main", "test"),
    "math500": ("math500/test.jsonl", "HuggingFaceH4/MATH-500", None, "test"),
    "math": ("math/test.jsonl.gz", "EleutherAI/hendrycks_math", None, "test"),
    "humaneval": ("humaneval/HumanEval.jsonl.gz", "openai/openai_humaneval", None, "test"),
    "mbpp": ("mbpp/mbpp.jsonl", "google-research-datasets/mbpp", "full", "test"),
}
MBPP_TEST_IDS = range(11, 511)  # the standard split: 1-10 prompts, 11-510 test


def read_records(path: Path) -> list[Example]:
    """JSON array or JSON lines (optionally gzip-compressed); errors name the file and the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:  # gzip.BadGzipFile is an OSError
        raise DataFileError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    if not text.strip():
        raise DataFileError(f"{path}: empty file")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{number}: invalid JSON line ({err.msg})") from err
    return records


class InstructionTask(Task):
    """Shared machinery: training data (Hub or substitute), encoding, generation-based evaluation.

    `task.train_source`, `task.prompt_style` and `task.protocols` are choices of the schema (checked at
    compose time); the evaluation set names depend on the family and are checked here."""

    # every evaluation set reports its size and the generation throughput
    builtin_metrics = (MetricSpec("*/n", MetricKind.count), MetricSpec("throughput/*", MetricKind.rate))

    def __init__(self, cfg: Any, tokenizer: Any, data_dir: str | Path, seed: int = 0):
        super().__init__(cfg, tokenizer, data_dir, seed)
        unknown = [s for s in cfg.eval_sets if s not in self.eval_set_names]
        if unknown:
            raise ValueError(
                f"task.eval_sets has {unknown}; valid for {cfg.name}: {', '.join(self.eval_set_names)}"
            )
        self.cache_dir = Path(
            os.environ.get("ASTRA_CACHE_DIR", Path.home() / ".cache" / "astra")
        )  # lm-eval YAMLs
        self.gen_stats: dict[str, GenerationStats] = {}

    eval_set_names: tuple[str, ...] = ()

    # --- training data ---------------------------------------------------------------------------
    def load_split(self, split: str) -> list[Example]:
        if split != "train":
            raise ValueError(f"{self.cfg.name}: only the 'train' split is a training split; got {split!r}")
        if self.cfg.train_source in ("auto", "hub") and self.cfg.hub_id:
            try:
                return self._hub_train()
            except Exception as err:  # offline or unknown id: fall back (auto) or say what failed (hub)
                if self.cfg.train_source == "hub":
                    raise MissingDataError(
                        f"task.train_source=hub but {self.cfg.hub_id!r} failed: {err}"
                    ) from err
                log.warning("%s: Hub dataset %s unavailable (%s); using the local substitute",
                            self.cfg.name, self.cfg.hub_id, type(err).__name__)  # fmt: skip
        return self._local_train()

    def _hub_train(self) -> list[Example]:
        from datasets import load_dataset

        rows = load_dataset(self.cfg.hub_id, split=self.cfg.hub_split)
        for column, value in self.cfg.hub_filter.items():
            rows = rows.filter(lambda r, c=column, v=value: r[c] == v)
        fields = {"instruction": "instruction", "input": "input", "output": "output", **self.cfg.hub_fields}
        self.dataset_used = f"hub:{self.cfg.hub_id} (split {self.cfg.hub_split}, {len(rows)} rows)"
        return [{k: str(r.get(src) or "") for k, src in fields.items()} for r in rows]

    def _local_train(self) -> list[Example]:
        paths = [self.data_dir / rel for rel in self.cfg.local_train]
        missing = [str(p) for p in paths if not p.exists()]
        if missing or not paths:
            raise MissingDataError(
                f"{self.cfg.name}: training data not found: {missing or 'task.local_train is empty'}; "
                f"the Hub dataset {self.cfg.hub_id!r} could not be loaded either. "
                "Set ASTRA_DATA_DIR (or paths.data_dir) to a folder laid out like ../shared/data."
            )
        examples = []
        for path in paths:
            self.record_file(path)
            examples += [self.local_example(r) for r in read_records(path)]
        note = f" ({self.cfg.local_note})" if self.cfg.local_note else ""
        self.dataset_used = f"local:{', '.join(self.cfg.local_train)}{note}, {len(examples)} rows"
        return examples

    def local_example(self, record: Example) -> Example:
        """A local record as {instruction, input, output} (Alpaca fields)."""
        return {
            "instruction": record["instruction"],
            "input": record.get("input") or "",
            "output": record["output"],
        }

    # --- encoding ------------------------------------------------------------------------------
    def prompt(self, example: Example) -> str:
        return prompts.alpaca_prompt(example["instruction"], example.get("input", ""), self.cfg.prompt_style)

    def response(self, example: Example) -> str:
        return prompts.response_sep(self.cfg.prompt_style) + example["output"]

    def encode(self, example: Example) -> dict[str, Any]:
        """input_ids = prompt + response + eos (cut to max_length); labels -100 on the prompt."""
        prompt_ids = self.tokenizer(self.prompt(example), add_special_tokens=True)["input_ids"]
        response_ids = self.tokenizer(self.response(example), add_special_tokens=False)["input_ids"]
        response_ids = [*response_ids, self.tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[: self.cfg.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: self.cfg.max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    def collator(self) -> Callable:
        """Right-pads input_ids with pad (= eos), labels with -100."""
        return DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def calibration_text(self, example: Example, fmt: str) -> str | tuple[str, str]:
        if fmt == "train_prompt":
            return self.prompt(example), self.response(example)
        if fmt == "code_release":
            instruction = "\n".join(t for t in (example["instruction"], example.get("input", "")) if t)
            return prompts.code_release_text(instruction, example["output"])
        if fmt == "text":
            return "\n".join(
                t for t in (example["instruction"], example.get("input", ""), example["output"]) if t
            )
        raise ValueError(f"calib.format={fmt!r}; valid: train_prompt, code_release, text")

    # --- evaluation ----------------------------------------------------------------------------
    def eval_records(self, name: str) -> list[Example]:
        """Records of evaluation set `name`, from data_dir or else the Hub."""
        rel, hub_id, hub_config, split = EVAL_SOURCES[name]
        path = self.data_dir / rel
        if path.exists():
            self.record_file(path)
            return read_records(path)
        return hub_split(hub_id, hub_config, split, path)

    def max_new_tokens(self, eval_cfg: Any) -> int:
        return self.cfg.max_new_tokens or eval_cfg.max_new_tokens

    def complete(
        self,
        name: str,
        model: torch.nn.Module,
        texts: list[str],
        eval_cfg: Any,
        stop: tuple[str, ...],
        n: int = 1,
    ) -> list[list[str]]:
        """Generated continuations `[prompt][sample]`, timing kept per evaluation set."""
        stats = self.gen_stats.setdefault(name, GenerationStats())
        if eval_cfg.get("backend", "hf") == "vllm":  # same prompts, stops and cut on the merged model
            from astra.vllm_backend import generate_vllm

            return generate_vllm(model, self.tokenizer, texts, max_new_tokens=self.max_new_tokens(eval_cfg),
                                 stop=stop, num_samples=n, temperature=eval_cfg.temperature, stats=stats)  # fmt: skip
        return generate(model, self.tokenizer, texts, batch_size=eval_cfg.batch_size,
                        max_new_tokens=self.max_new_tokens(eval_cfg), stop=stop, num_samples=n,
                        temperature=eval_cfg.temperature, stats=stats, progress=name)  # fmt: skip

    def evaluate(self, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name in self.cfg.eval_sets:
            metrics.update(self.evaluate_set(name, model, eval_cfg))
            stats = self.gen_stats.get(name)
            if stats and stats.seconds:
                metrics[f"throughput/{name}/samples_per_s"] = stats.samples_per_s
                log.info("%s: %d sequences, %d new tokens in %.1fs (%.3f samples/s)",
                         name, stats.n_sequences, stats.new_tokens, stats.seconds, stats.samples_per_s)  # fmt: skip
            self.gen_stats.pop(name, None)
        return metrics

    def evaluate_set(self, name: str, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        raise NotImplementedError

    def record_samples(self, name: str, rows: list[Example], completions: list[list[str]], answers: list[Any],
                       golds: list[Any], correct: list[bool]) -> None:  # fmt: skip
        """Per-sample outputs of evaluation set `name` into `self.samples` (the pipeline saves them next to
        the result, astra.artifacts.save_samples): prompt id, generation, extracted answer, gold, correct."""
        samples = self.__dict__.setdefault("samples", [])
        columns = zip(rows, completions, answers, golds, correct, strict=True)
        for i, (row, comp, answer, gold, ok) in enumerate(columns):
            ident = next((row[k] for k in ("task_id", "unique_id", "id", "idx") if k in row), i)
            samples.append({"set": name, "id": str(ident), "generation": comp[0] if len(comp) == 1 else comp,
                            "answer": answer, "gold": gold, "correct": bool(ok)})  # fmt: skip


def _limit(rows: list[Example], eval_cfg: Any) -> list[Example]:
    return rows[: eval_cfg.limit] if eval_cfg.limit else rows


@register_family("math")
class MathTask(InstructionTask):
    """MetaMathQA training (offline: GSM8K train in MetaMath's response style); GSM8K / MATH evaluation."""

    eval_set_names = ("gsm8k", "math500", "math")

    def local_example(self, record: Example) -> Example:
        if (
            "question" in record
        ):  # GSM8K: calculator tags dropped, "#### n" -> "The answer is: n" (MetaMathQA)
            return {
                "instruction": record["question"],
                "input": "",
                "output": gsm8k_to_metamath(record["answer"]),
            }
        return super().local_example(record)

    def evaluate_set(self, name: str, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        rows = _limit(self.eval_records(name), eval_cfg)
        if name == "gsm8k":
            questions, golds = [r["question"] for r in rows], [gsm8k_gold(r["answer"]) for r in rows]
            correct = gsm8k_correct
        else:
            questions, golds, correct = (
                [r["problem"] for r in rows],
                [r["answer"] for r in rows],
                math_correct,
            )
        texts = [prompts.metamath_eval_prompt(q) for q in questions]
        completions = self.complete(name, model, texts, eval_cfg, METAMATH_STOP)
        hits = [correct(c[0], g) for c, g in zip(completions, golds, strict=True)]
        extract = gsm8k_prediction if name == "gsm8k" else math_prediction
        self.record_samples(name, rows, completions, [extract(c[0]) for c in completions], golds, hits)
        return {f"{name}/accuracy": float(np.mean(hits)) if hits else 0.0, f"{name}/n": float(len(hits))}


@register_family("code")
class CodeTask(InstructionTask):
    """CodeFeedback-Python training (offline: Code Alpaca 2k); HumanEval / MBPP pass@k in the sandbox."""

    eval_set_names = ("humaneval", "mbpp")

    def eval_records(self, name: str) -> list[Example]:
        rows = super().eval_records(name)
        return [r for r in rows if int(r["task_id"]) in MBPP_TEST_IDS] if name == "mbpp" else rows

    def check_eval(self, eval_cfg: Any) -> None:
        if not eval_cfg.allow_code_execution:
            raise PermissionError(
                f"{', '.join(self.cfg.eval_sets)} run model-generated code; set eval.allow_code_execution=true to "
                "run it in the sandbox (subprocess, time/memory limits, no network, writes confined to a temp dir)"
            )

    def evaluate_set(self, name: str, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        self.check_eval(eval_cfg)
        rows = _limit(self.eval_records(name), eval_cfg)
        if name == "humaneval":
            instructions = [prompts.humaneval_instruction(r["prompt"]) for r in rows]
        else:
            instructions = [prompts.mbpp_instruction(r["text"], r["test_list"]) for r in rows]
        texts = [prompts.alpaca_prompt(i, style=self.cfg.prompt_style) for i in instructions]
        completions = self.complete(name, model, texts, eval_cfg, CODE_STOP, n=eval_cfg.num_samples)
        metrics, runs = score_completions(name, rows, completions, ks=eval_cfg.pass_k, workers=eval_cfg.workers,
                                          timeout_s=eval_cfg.timeout_s,
                                          memory_mb=eval_cfg.memory_mb)  # fmt: skip
        passed = [[bool(x.passed) for x in r] for r in runs]  # per sample; "correct": the first one passed
        self.record_samples(name, rows, completions, passed, [None] * len(rows), [p[0] for p in passed])
        return {**{f"{name}/{k}": v for k, v in metrics.items()}, f"{name}/n": float(len(rows))}


@register_family("commonsense")
class CommonsenseTask(InstructionTask):
    """Commonsense-170K training (offline: the staged per-task train files); 8 benchmarks, 2 protocols."""

    eval_set_names = cs.TASKS
    builtin_metrics = (*InstructionTask.builtin_metrics, MetricSpec("commonsense/n_tasks", MetricKind.count))

    def test_file(self, name: str) -> Path:
        return self.data_dir / "commonsense" / name / "test.json"

    @cached_property
    def present_sets(self) -> list[str]:
        """Evaluation sets whose test file exists (HellaSwag is not obtainable offline: skipped, logged)."""
        missing = [n for n in self.cfg.eval_sets if not self.test_file(n).exists()]
        if missing:
            log.warning("commonsense: no test file for %s (expected %s); left out of the averages",
                        missing, [str(self.test_file(n)) for n in missing])  # fmt: skip
        present = [n for n in self.cfg.eval_sets if n not in missing]
        if not present:
            raise MissingDataError(f"no commonsense test file found under {self.data_dir / 'commonsense'}")
        return present

    def evaluate(self, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        metrics: dict[str, float] = {"commonsense/n_tasks": float(len(self.present_sets))}
        if "generation" in self.cfg.protocols:
            metrics.update(super().evaluate(model, eval_cfg))
            accs = [metrics[f"gen/{n}/accuracy"] for n in self.present_sets]
            metrics["gen/avg_accuracy"] = float(np.mean(accs))
        if "loglik" in self.cfg.protocols:
            files = {n: self.test_file(n) for n in self.present_sets}
            start = time.perf_counter()
            results = cs.loglik_accuracy(
                model, self.tokenizer, files, self.cache_dir, eval_cfg.limit, eval_cfg.batch_size
            )
            n_docs = sum(row["n"] for row in results.values())
            metrics["throughput/loglik/samples_per_s"] = n_docs / (time.perf_counter() - start)
            for name, row in results.items():
                metrics.update({f"loglik/{name}/{k}": v for k, v in row.items()})
            metrics["loglik/avg_acc"] = float(np.mean([row["acc"] for row in results.values()]))
        return metrics

    def evaluate_set(self, name: str, model: torch.nn.Module, eval_cfg: Any) -> dict[str, float]:
        if name not in self.present_sets:
            return {}
        path = self.test_file(name)
        self.record_file(path)
        rows = _limit(read_records(path), eval_cfg)
        texts = [
            prompts.alpaca_prompt(r["instruction"], r.get("input", ""), self.cfg.prompt_style) for r in rows
        ]
        completions = self.complete(name, model, texts, eval_cfg, COMMONSENSE_STOP)
        acc = cs.generation_accuracy(name, [c[0] for c in completions], [r["answer"] for r in rows])
        labels = [cs.extract_label(name, c[0]) for c in completions]
        golds = [r["answer"].strip() for r in rows]
        hits = [a == g for a, g in zip(labels, golds, strict=True)]
        self.record_samples(f"gen/{name}", rows, completions, labels, golds, hits)
        return {f"gen/{name}/accuracy": acc, f"gen/{name}/n": float(len(rows))}
