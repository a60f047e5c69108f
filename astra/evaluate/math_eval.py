"""GSM8K and MATH answer extraction and MATH answer equivalence.

Protocol (MetaMath eval_gsm8k.py / eval_math.py): the model answers a zero-shot chain-of-thought
prompt and the final answer is the text after the *last* "The answer is" (with or without a colon).
A completion without that phrase scores 0, as in MetaMath.

- GSM8K: the first number after the phrase, compared numerically with the gold `#### <n>`.
- MATH: the text after the phrase (or, failing that, nothing), normalised as in Hendrycks et al.'s
  `is_equiv` (fractions, `\\boxed{}`, `\\left/\\right`, units in `\\text{}`, degrees, dollars,
  spacing, `x = ...`) with a numeric comparison on top when both sides are plain numbers.
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_PHRASE = re.compile(r"[Tt]he answer is:?\s*")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
GSM8K_CALC = re.compile(r"<<[^>]*>>")


# --- extraction ------------------------------------------------------------------------------------
def after_answer_phrase(completion: str) -> str | None:
    """Text after the last "The answer is[:]", or None when the phrase is absent."""
    matches = list(ANSWER_PHRASE.finditer(completion))
    return completion[matches[-1].end() :].strip() if matches else None


def parse_number(text: str) -> float | None:
    """A plain number "1,234.5", "-3", "3/4", ".5" as float; None when `text` is not one."""
    text = text.replace(",", "").strip()
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_gold(answer: str) -> float:
    """The number after "#### " in a GSM8K `answer` field."""
    value = parse_number(answer.split("####")[-1])
    if value is None:
        raise ValueError(f"GSM8K answer without a numeric '#### <n>' line: {answer[-80:]!r}")
    return value


def gsm8k_prediction(completion: str) -> float | None:
    """The first number after the last "The answer is" (None when absent)."""
    tail = after_answer_phrase(completion)
    if tail is None:
        return None
    match = NUMBER.search(tail)
    return parse_number(match.group(0)) if match else None


def gsm8k_correct(completion: str, gold: float) -> bool:
    pred = gsm8k_prediction(completion)
    return pred is not None and abs(pred - gold) < 1e-4 * max(1.0, abs(gold))


def gsm8k_to_metamath(answer: str) -> str:
    """A GSM8K solution in MetaMathQA's response style: no calculator tags, "The answer is: <n>"."""
    body, _, final = answer.rpartition("####")
    return f"{GSM8K_CALC.sub('', body).strip()}\nThe answer is: {final.strip()}"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:  # "\\boxed 5"
        rest = text[start + len("\\boxed") :].strip()
        return rest.split("$")[0].strip() or None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def math_prediction(completion: str) -> str | None:
    """The answer text after the last "The answer is" (a trailing period dropped)."""
    tail = after_answer_phrase(completion)
    if tail is None:
        return None
    return tail[:-1] if tail.endswith(".") else tail  # MetaMath: the whole remainder, final "." dropped


# --- MATH normalisation (after Hendrycks et al., math_equivalence.py) ------------------------------
def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += f"{{{a}}}{b}{rest}" if b == "{" else f"{{{a}}}{{{b}}}{rest}"
    return out


def _fix_a_slash_b(s: str) -> str:
    """`3/4` -> `\\frac{3}{4}` for integer a, b."""
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else s


def _fix_sqrt(s: str) -> str:
    """`\\sqrt2` -> `\\sqrt{2}`."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _remove_units(s: str) -> str:
    """Drop a trailing unit in `\\text{ cm}` / `\\mbox{...}` (the value before it is the answer)."""
    unit = r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .^0-9]*\}(?:\^\d|\^\{\d\})?\s*$"
    return re.sub(unit, "", s).strip() or s


def strip_math(s: str) -> str:
    """Canonical string of a MATH answer for comparison."""
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ").replace("\\!", "").strip().strip("$").strip().rstrip(".")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _remove_units(s)
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)  # \text{(A)} -> (A)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if "=" in s and len(s.split("=")[0].strip()) <= 2:  # "x = 5" -> "5", "k=2" -> "2"
        s = s.split("=", 1)[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    return s


def _numeric(s: str) -> float | None:
    match = re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if match:
        return int(match.group(1)) / int(match.group(2)) if int(match.group(2)) else None
    return parse_number(s) if re.fullmatch(r"-?\d*\.?\d+", s) else None


def math_equiv(pred: str | None, gold: str) -> bool:
    """True when `pred` and `gold` are the same MATH answer after normalisation (or equal numbers)."""
    if pred is None:
        return False
    a, b = strip_math(pred), strip_math(gold)
    if a == b:
        return True
    x, y = _numeric(a), _numeric(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def math_correct(completion: str, gold: str) -> bool:
    return math_equiv(math_prediction(completion), gold)
