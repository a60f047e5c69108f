"""HumanEval / MBPP functional correctness: completions -> programs -> sandbox -> pass@k.

A completion is the model's response to the Alpaca-template instruction (see `astra.prompts`). The
code is the first fenced block when there is one, else the whole response. For HumanEval, a
response that (re)defines the entry point is run after the prompt's header (imports and helper
functions before the entry point); otherwise it is taken as the body that continues the prompt.
Programs run only in `astra.evaluate.sandbox`, and only when the caller allows code execution.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from astra.evaluate.sandbox import ExecResult, run_programs

FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The first fenced code block of `response`, or `response` itself when it has none."""
    match = FENCE.search(response)
    return match.group(1) if match else response


def humaneval_program(problem: dict[str, Any], response: str) -> str:
    """Prompt (or its header) + completion + the problem's `check` + the call that runs it."""
    code, entry = extract_code(response), problem["entry_point"]
    prompt = problem["prompt"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        header = prompt[: re.search(rf"^def\s+{re.escape(entry)}\s*\(", prompt, re.MULTILINE).start()]
        body = header + "\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def mbpp_program(problem: dict[str, Any], response: str) -> str:
    """Completion + the problem's set-up code + its asserts."""
    tests = "\n".join(problem["test_list"])
    return f"{extract_code(response)}\n\n{problem.get('test_setup_code', '')}\n\n{tests}\n"


PROGRAM_BUILDERS = {"humaneval": humaneval_program, "mbpp": mbpp_program}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_completions(
    kind: str,
    problems: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    ks: Sequence[int] = (1,),
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
) -> tuple[dict[str, float], list[list[ExecResult]]]:
    """pass@k (mean over problems) of `completions[i]` (n samples) for `problems[i]`, and every result."""
    if kind not in PROGRAM_BUILDERS:
        raise ValueError(f"code benchmark {kind!r}; valid: {', '.join(PROGRAM_BUILDERS)}")
    build = PROGRAM_BUILDERS[kind]
    programs = [build(p, c) for p, samples in zip(problems, completions, strict=True) for c in samples]
    flat = run_programs(programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    results, i = [], 0
    for samples in completions:
        results.append(flat[i : i + len(samples)])
        i += len(samples)
    n = min(len(s) for s in completions) if completions else 0
    metrics = {
        f"pass@{k}": float(np.mean([pass_at_k(len(r), sum(x.passed for x in r), k) for r in results]))
        for k in ks
        if k <= n
    }
    return metrics, results
