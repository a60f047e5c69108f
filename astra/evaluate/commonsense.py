"""Commonsense reasoning (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA), two protocols.

- **generation** (LLM-Adapters / DoRA `commonsense_evaluate.py`): the model answers the templated
  instruction; the prediction is the *first* label token (e.g. `answer2`) found in the response,
  compared with the gold `answer`. No label token = wrong.
- **loglik** (lm-eval): the choices are parsed out of the LLM-Adapters instruction and scored by
  log-likelihood through lm-eval's `HFLM` on the in-memory model. Task YAMLs are generated into a
  folder under the cache, pointing at the local test files by absolute path; their `process_docs`
  calls `lm_eval_docs` below (through a two-line shim module next to the YAMLs, as lm-eval's
  `!function` tag loads functions from files beside the YAML). WinoGrande uses lm-eval's partial
  scoring (the sentence up to the blank, filled with each option, is the context; the rest is the
  continuation scored); the other tasks score `" " + choice` after `Question: ...\\nAnswer:`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("astra.commonsense")

# task -> label tokens, in the order LLM-Adapters' extract_answer searches for them
LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}
TASKS = tuple(LABELS)


def extract_label(task: str, response: str) -> str:
    """LLM-Adapters `extract_answer`: the first label token of `task` in the response, or ""."""
    if task not in LABELS:
        raise ValueError(f"commonsense task {task!r}; valid: {', '.join(TASKS)}")
    found = re.findall("|".join(LABELS[task]), response.strip())
    return found[0] if found else ""


# --- choices from the LLM-Adapters instruction (for the log-likelihood protocol) -------------------
def _split_numbered(text: str, word: str) -> list[str]:
    """ "Answer1: a Answer2: b" -> ["a", "b"]."""
    parts = re.split(rf"\s*\b{word}\d+:\s*", text)
    return [p.strip() for p in parts[1:]]


def parse_choices(task: str, instruction: str) -> tuple[str, list[str]]:
    """(question, choices) from an LLM-Adapters instruction; for WinoGrande the sentence with `_`."""
    body = instruction.split("\n\nAnswer format:")[0]
    if task == "boolq":
        return body.split("question:", 1)[1].strip(), ["true", "false"]
    if task == "winogrande":
        head, _, options = body.partition("\n\nOption1:")
        sentence = head.split("sentence:", 1)[1].strip()
        options = ("Option1:" + options).split("Answer format:")[0]
        return sentence, _split_numbered(options, "Option")
    if task == "piqa":
        head, *solutions = re.split(r"\n\nSolution\d+:\s*", body)
        return head.split("question:", 1)[1].strip(), [s.strip() for s in solutions]
    if task == "hellaswag":
        head, _, endings = body.partition("\n\nEnding1:")
        return head.split(":", 1)[1].strip(), _split_numbered("Ending1:" + endings, "Ending")
    head, _, answers = body.partition("\n\nAnswer1:")
    return head.split("question:", 1)[1].strip(), _split_numbered("Answer1:" + answers, "Answer")


def gold_index(task: str, answer: str) -> int:
    return LABELS[task].index(answer.strip())


def lm_eval_doc(task: str, doc: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval document: `query`, `choices`, `gold` (+ `contexts`, `continuation` for WinoGrande)."""
    question, choices = parse_choices(task, doc["instruction"])
    gold = gold_index(task, doc["answer"])
    out = {"query": f"Question: {question}\nAnswer:", "choices": choices, "gold": gold,
           "contexts": [], "continuation": ""}  # fmt: skip
    if task == "winogrande":
        before, _, after = question.partition("_")
        out["contexts"] = [before + option for option in choices]
        out["continuation"] = after.strip()  # lm-eval's target_delimiter " " goes in front
    return out


def lm_eval_docs(task: str, dataset: Any) -> Any:
    """`process_docs` for a `datasets.Dataset` of LLM-Adapters records."""
    return dataset.map(lambda doc: lm_eval_doc(task, doc), remove_columns=dataset.column_names)


# --- lm-eval task YAMLs ----------------------------------------------------------------------------
def lm_eval_task_name(task: str) -> str:
    return "astra_cs_" + re.sub(r"\W", "_", task).lower()


def _task_yaml(task: str, path: Path) -> str:
    common = f"""task: {lm_eval_task_name(task)}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {str(path.resolve())!r}
test_split: test
output_type: multiple_choice
process_docs: !function astra_cs_docs.{lm_eval_task_name(task)}
"""
    if task == "winogrande":  # partial scoring: the context varies, the continuation is fixed
        fields = 'doc_to_text: "{{gold}}"\ndoc_to_target: "{{continuation}}"\ndoc_to_choice: "{{contexts}}"\n'
    else:
        fields = 'doc_to_text: "{{query}}"\ndoc_to_target: "{{gold}}"\ndoc_to_choice: "{{choices}}"\n'
    metrics = "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    if task != "winogrande":
        metrics += "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    return common + fields + metrics + "metadata:\n  version: 1.0\n"


def write_lm_eval_tasks(files: dict[str, Path], cache_dir: str | Path) -> Path:
    """YAMLs (+ the `process_docs` shim) for `{task: test.json path}`; returns their folder.

    The folder name hashes the YAML text, so a changed prompt or path never reuses stale YAMLs.
    """
    yamls = {task: _task_yaml(task, path) for task, path in files.items()}
    shim = "from astra.evaluate.commonsense import lm_eval_docs\n\n" + "".join(
        f"def {lm_eval_task_name(t)}(dataset):\n    return lm_eval_docs({t!r}, dataset)\n\n" for t in files
    )
    key = hashlib.sha256((shim + "".join(yamls.values())).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "lm_eval_tasks" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "astra_cs_docs.py").write_text(shim)
    for task, text in yamls.items():
        (folder / f"{lm_eval_task_name(task)}.yaml").write_text(text)
    return folder


def loglik_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    files: dict[str, Path],
    cache_dir: str | Path,
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """{task: {"acc": .., "acc_norm": .., "n": docs}} by lm-eval's log-likelihood protocol (zero-shot)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from astra.evaluate.generation import merged_adapters

    folder = write_lm_eval_tasks(files, cache_dir)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers live inside
    with _right_padding(tokenizer), merged_adapters(model):  # same function, fewer ops per layer
        lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=batch_size, device=str(base.device))
        out = simple_evaluate(
            model=lm,
            tasks=[lm_eval_task_name(t) for t in files],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            num_fewshot=0,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    results = {}
    for task in files:
        row = out["results"][lm_eval_task_name(task)]
        results[task] = {m: float(row[f"{m},none"]) for m in ("acc", "acc_norm") if f"{m},none" in row}
        results[task]["n"] = float(
            out.get("n-samples", {}).get(lm_eval_task_name(task), {}).get("effective", 0)
        )
    return results


class _right_padding:
    """lm-eval pads its own batches; make sure a caller's left-padding setting does not leak in."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __enter__(self) -> None:
        self.side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"

    def __exit__(self, *exc: object) -> None:
        self.tokenizer.padding_side = self.side


def generation_accuracy(task: str, responses: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of responses whose extracted label equals the gold label."""
    hits = [extract_label(task, r) == a.strip() for r, a in zip(responses, answers, strict=True)]
    return sum(hits) / max(1, len(hits))
