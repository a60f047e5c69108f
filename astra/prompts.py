"""Prompt templates of the NLG experiments.

- `alpaca_prompt`: the Alpaca template used by MetaMath / PiSSA-style training scripts (the authors
  build on them): the model sees the prompt, and the loss is on the response that follows it.
- `metamath_eval_prompt`: MetaMath's zero-shot chain-of-thought prompt for GSM8K and MATH (the Alpaca
  prompt followed by " Let's think step by step."); the answer is read after "The answer is".
- `code_instruction`: HumanEval / MBPP instructions in the Alpaca template (WizardCoder wording).
- `LLM_ADAPTERS_PROMPT`: LLM-Adapters' commonsense template, verbatim (including its indentation),
  for users who want to reproduce that repository's numbers exactly (`task.prompt_style=llm_adapters`).

Separately tokenised prompt and response are concatenated (see `astra.nlg`), so `RESPONSE_SEP` is
the one string between them both at training time and at generation time.
"""

from __future__ import annotations

from enum import StrEnum

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
# LLM-Adapters commonsense_evaluate.py / finetune.py (no-input branch), kept byte-for-byte: its
# indentation and the trailing space after "request." are part of what those models were trained on.
LLM_ADAPTERS_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "\n\n                ### Instruction:\n                {instruction}\n\n"
    "                ### Response:\n                "
)
RESPONSE_SEP = " "  # between "### Response:" and the response text (alpaca style)
COT_TRIGGER = "Let's think step by step."  # MetaMath eval_gsm8k.py / eval_math.py


class PromptStyle(StrEnum):
    alpaca = "alpaca"  # MetaMath / PiSSA training scripts
    llm_adapters = "llm_adapters"  # LLM-Adapters' commonsense template, verbatim


PROMPT_STYLES = tuple(PromptStyle)


def alpaca_prompt(instruction: str, input_text: str = "", style: str = "alpaca") -> str:
    """The prompt up to and including "### Response:" (the response follows after `RESPONSE_SEP`)."""
    if style == "llm_adapters":
        if input_text:
            instruction = f"{instruction}\n\n{input_text}"
        return LLM_ADAPTERS_PROMPT.format(instruction=instruction)
    if style != PromptStyle.alpaca:
        raise ValueError(f"prompt style {style!r}; valid: {', '.join(PROMPT_STYLES)}")
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def response_sep(style: str = "alpaca") -> str:
    """What separates prompt and response: LLM-Adapters' prompt already ends in its indentation."""
    return "" if style == "llm_adapters" else RESPONSE_SEP


def metamath_eval_prompt(question: str) -> str:
    """MetaMath zero-shot CoT: the Alpaca prompt, then the response opens with the CoT trigger."""
    return alpaca_prompt(question) + RESPONSE_SEP + COT_TRIGGER


def humaneval_instruction(prompt: str) -> str:
    """HumanEval in the Alpaca template: the signature and docstring to complete."""
    return f"Create a Python script for this problem:\n{prompt}"


def mbpp_instruction(text: str, tests: list[str]) -> str:
    """MBPP in the Alpaca template: the problem and its asserts (they fix the function name)."""
    return f"Create a Python script for this problem:\n{text}\nTest examples:\n" + "\n".join(tests)


def code_release_text(instruction: str, output: str) -> tuple[str, str]:
    """The authors' released calibration text `instruction + "\\n### Response:" + output`, as (prompt, response)."""
    return instruction + "\n### Response:", output
