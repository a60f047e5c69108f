"""Code execution: reference solutions pass, wrong and hostile completions fail and are contained."""

from __future__ import annotations

import gzip
import json
import math
import os
import time

import pytest

from astra.evaluate.code_eval import extract_code, humaneval_program, pass_at_k, score_completions
from astra.evaluate.sandbox import run_program
from tests.conftest import DATA_DIR, requires_data

WORKERS = 2


def humaneval_problems() -> list[dict]:
    with gzip.open(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mbpp_problems() -> list[dict]:
    with open(DATA_DIR / "mbpp" / "mbpp.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.integration  # checks the whole staged benchmark file (tests/conftest.py)
def test_every_humaneval_canonical_solution_passes_and_wrong_ones_fail():
    problems = humaneval_problems()
    assert len(problems) == 164
    metrics, results = score_completions("humaneval", problems, [[p["canonical_solution"]] for p in problems],
                                         workers=WORKERS)  # fmt: skip
    failed = [
        (p["task_id"], r[0].detail[-200:]) for p, r in zip(problems, results, strict=True) if not r[0].passed
    ]
    assert metrics["pass@1"] == 1.0, failed
    wrong = [["    return None\n"] for _ in problems[:20]]
    metrics, _ = score_completions("humaneval", problems[:20], wrong, workers=WORKERS)
    assert metrics["pass@1"] == 0.0


@requires_data
def test_humaneval_full_function_in_a_fence_passes():
    """A chat-style answer that redefines the whole function inside ```python ... ``` is run correctly."""
    problems = humaneval_problems()[:10]
    responses = [
        [f"Here is the code:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."] for p in problems
    ]
    metrics, _ = score_completions("humaneval", problems, responses, workers=WORKERS)
    assert metrics["pass@1"] == 1.0


@pytest.mark.integration  # checks the whole staged benchmark file (tests/conftest.py)
def test_every_mbpp_reference_solution_passes_and_wrong_ones_fail():
    problems = mbpp_problems()
    assert len(problems) == 974
    metrics, results = score_completions("mbpp", problems, [[p["code"]] for p in problems], workers=WORKERS)
    failed = [
        (p["task_id"], r[0].detail[-200:]) for p, r in zip(problems, results, strict=True) if not r[0].passed
    ]
    assert metrics["pass@1"] == 1.0, failed
    # the right function of the *next* problem: wrong names and wrong behaviour
    shifted = [[problems[(i + 1) % 50]["code"]] for i in range(50)]
    metrics, _ = score_completions("mbpp", problems[:50], shifted, workers=WORKERS)
    assert metrics["pass@1"] < 0.05


def test_extract_code_prefers_the_first_fence():
    assert extract_code("text\n```python\nx = 1\n```\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("```\nz = 3\n") == "z = 3\n"  # unterminated fence: up to the end


def test_humaneval_program_keeps_prompt_helpers():
    problem = {"prompt": "import math\n\ndef helper(x):\n    return x\n\ndef f(x):\n    '''doc'''\n",
               "entry_point": "f", "test": "def check(c):\n    assert c(2) == 2\n"}  # fmt: skip
    program = humaneval_program(problem, "```python\ndef f(x):\n    return helper(x)\n```")
    assert program.startswith("import math\n\ndef helper(x)") and "check(f)" in program
    assert run_program(program).passed


@pytest.mark.parametrize(
    "n, c, k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10), (5, 5, 5)]
)
def test_pass_at_k_equals_the_combinatorial_definition(n, c, k):
    """pass@k = 1 - C(n-c, k) / C(n, k), the probability that a k-subset holds a correct sample."""
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 5"):
        pass_at_k(3, 1, 5)


# --- hostile completions ---------------------------------------------------------------------------
def test_network_is_blocked():
    for program in (
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
        "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))",
    ):
        result = run_program(program, timeout_s=5)
        assert not result.passed and "sandbox" in result.detail, result


def test_writes_outside_the_temp_dir_are_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.remove({str(keep)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')",
    ):
        result = run_program(program, timeout_s=5)
        assert not result.passed, program
    assert not target.exists() and keep.read_text() == "precious"
    # writing inside the sandbox's own working directory is fine
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'").passed


def test_infinite_loop_times_out():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout_s=2)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - start < 10


def test_memory_bomb_fails_without_hurting_the_host():
    for program in ("x = bytearray(16 * 2**30)", "x = [0] * (10**10)", "s = 'a' * (4 * 2**30)"):
        result = run_program(program, timeout_s=10, memory_mb=512)
        assert not result.passed and "MemoryError" in result.detail, result


def test_processes_and_native_code_are_refused():
    for program in (
        "import os\nos.fork()",
        "import os\nos.system('echo hi')",
        "import subprocess\nsubprocess.run(['true'])",
        "import ctypes",
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)",
    ):
        result = run_program(program, timeout_s=5)
        assert not result.passed and "sandbox" in result.detail, (program, result)


def test_hostile_completion_scores_as_failure():
    problem = {"prompt": "def f(x):\n", "entry_point": "f", "test": "def check(c):\n    assert c(1) == 1\n"}
    hostile = ["    import socket; socket.create_connection(('1.1.1.1', 80))\n", "    while True: pass\n",
               "    return bytearray(16 * 2**30)\n"]  # fmt: skip
    metrics, results = score_completions("humaneval", [problem] * 3, [[h] for h in hostile], timeout_s=2)
    assert metrics["pass@1"] == 0.0 and [r[0].status for r in results][1] == "timeout"
