"""NLG tasks on a tiny random LLaMA: response-only loss, generation, commonsense protocols, data provenance."""

from __future__ import annotations

import json
import random

import pytest
import torch

from astra import prompts
from astra.data import MissingDataError, build_task
from astra.evaluate import commonsense as cs
from astra.evaluate.generation import generate
from astra.models import load_model
from tests.conftest import DATA_DIR, requires_data

pytestmark = requires_data


@pytest.fixture(scope="module")
def tiny():
    """(config factory, model, tokenizer) for the random tiny-llama."""
    from astra.pipeline import compose_config

    cfg = compose_config(["model=tiny-llama", "task=metamath"])
    model, tokenizer, _ = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=0)
    return model.eval(), tokenizer


def make_task(name: str, tokenizer, *overrides: str):
    from astra.pipeline import compose_config

    cfg = compose_config(["model=tiny-llama", f"task={name}", *overrides])
    return build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=0)


@pytest.mark.parametrize("name", ["metamath", "code", "commonsense"])
def test_encode_masks_exactly_the_prompt(tiny, name):
    _, tok = tiny
    task = make_task(name, tok, "task.train_limit=20")
    for ex in task.train_examples:
        enc = task.encode(ex)
        n_prompt = len(tok(task.prompt(ex))["input_ids"])
        assert enc["labels"][:n_prompt] == [-100] * n_prompt
        assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]  # every response token is trained
        assert tok.decode(enc["input_ids"][:n_prompt]) == task.prompt(ex)
        if len(enc["input_ids"]) < task.cfg.max_length:
            assert enc["input_ids"][-1] == tok.eos_token_id
            assert tok.decode(enc["input_ids"][n_prompt:-1]) == task.response(ex)


def test_encode_truncates_to_max_length(tiny):
    _, tok = tiny
    task = make_task("code", tok, "task.max_length=16", "task.train_limit=5")
    for ex in task.train_examples:
        enc = task.encode(ex)
        assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"]) <= 16


def test_collator_pads_labels_with_ignore_index(tiny):
    _, tok = tiny
    task = make_task("commonsense", tok, "task.train_limit=4")
    batch = task.collator()([task.encode(ex) for ex in task.train_examples])
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert (batch["labels"][row, n:] == -100).all() and batch["attention_mask"][row, :n].all()


def test_gsm8k_substitute_is_metamath_style_and_recorded(tiny):
    _, tok = tiny
    task = make_task("metamath", tok)
    ex = task.train_examples[0]
    assert "The answer is: " in ex["output"] and "####" not in ex["output"] and "<<" not in ex["output"]
    assert "substitute for MetaMathQA" in task.dataset_used and "gsm8k/train.jsonl" in task.dataset_used
    assert any(p.endswith("gsm8k/train.jsonl") for p in task.data_files)


def test_hub_only_fails_fast_offline_and_missing_data_names_the_file(tiny, tmp_path):
    _, tok = tiny
    with pytest.raises(MissingDataError, match="MetaMathQA"):
        make_task("metamath", tok, "task.train_source=hub").load_split("train")
    with pytest.raises(MissingDataError, match="gsm8k/train.jsonl"):
        make_task("metamath", tok, f"paths.data_dir={tmp_path}").load_split("train")


def test_calibration_formats(tiny):
    _, tok = tiny
    task = make_task("code", tok, "task.train_limit=3")
    ex = next(e for e in task.load_split("train") if e["input"])
    prompt, response = task.calibration_text(ex, "train_prompt")
    assert prompt.endswith("### Response:") and "### Input:" in prompt and response == " " + ex["output"]
    release = task.calibration_text(ex, "code_release")
    assert release == (f"{ex['instruction']}\n{ex['input']}\n### Response:", ex["output"])
    assert task.calibration_text(ex, "text").endswith(ex["output"])
    with pytest.raises(ValueError, match="train_prompt"):
        task.calibration_text(ex, "chat")


def test_prompts_are_the_published_templates():
    assert prompts.metamath_eval_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ?\n\n### Response: Let's think step by step."
    )
    assert prompts.alpaca_prompt("Q?", style="llm_adapters") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. \n\n                ### Instruction:\n                Q?\n\n                ### Response:\n"
        "                "
    )


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    """Left padding + attention mask: a prompt's greedy continuation does not depend on its batch."""
    model, tok = tiny
    texts = [
        "Short one.",
        "A much longer prompt that needs a lot more tokens than the first",
        "Mid size prompt",
    ]
    side = tok.padding_side
    batched = generate(model, tok, texts, batch_size=3, max_new_tokens=6)
    single = [generate(model, tok, [t], batch_size=1, max_new_tokens=6)[0] for t in texts]
    assert batched == single and tok.padding_side == side
    assert all(len(c) == 1 and c[0] for c in batched)


def test_code_task_refuses_to_execute_without_permission(tiny):
    model, tok = tiny
    from astra.pipeline import compose_config

    task = make_task("code", tok)
    eval_cfg = compose_config(["eval.limit=1"]).eval
    with pytest.raises(PermissionError, match="allow_code_execution"):
        task.evaluate(model, eval_cfg)


def test_unknown_eval_set_is_a_clear_error(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="valid for metamath: gsm8k, math500, math"):
        make_task("metamath", tok, "task.eval_sets=[gsm8k,svamp]")


# --- commonsense ----------------------------------------------------------------------------------
def commonsense_rows(name: str) -> list[dict]:
    return json.loads((DATA_DIR / "commonsense" / name / "test.json").read_text())


PRESENT = [t for t in cs.TASKS if (DATA_DIR / "commonsense" / t / "test.json").exists()]


@pytest.mark.integration  # checks the whole staged benchmark file (tests/conftest.py)
@pytest.mark.parametrize("name", PRESENT)
def test_llm_adapters_extraction_gold_scores_one_shuffled_near_chance(name):
    rows = commonsense_rows(name)
    outputs, answers = [r["output"] for r in rows], [r["answer"] for r in rows]
    assert cs.generation_accuracy(name, outputs, answers) == 1.0
    random.Random(0).shuffle(outputs)
    n_choices = len(rows[0]["instruction"].split("Answer format:")[1].split("/"))
    assert abs(cs.generation_accuracy(name, outputs, answers) - 1 / n_choices) < 0.1


def test_llm_adapters_extraction_takes_the_first_label():
    assert cs.extract_label("ARC-Easy", "the correct answer is answer2, not answer1") == "answer2"
    assert cs.extract_label("boolq", "False. it is false") == "false"  # case-sensitive, as LLM-Adapters
    assert cs.extract_label("piqa", "no idea") == ""


@pytest.mark.parametrize("name", PRESENT)
def test_choices_parse_from_every_instruction(name):
    for row in commonsense_rows(name):
        question, choices = cs.parse_choices(name, row["instruction"])
        labels = row["instruction"].split("Answer format:")[1].strip().split("/")
        assert question and len(choices) == len(labels) and all(choices)
        assert 0 <= cs.gold_index(name, row["answer"]) < len(choices)


def test_lm_eval_yamls_point_at_local_files_by_absolute_path(tmp_path):
    files = {n: DATA_DIR / "commonsense" / n / "test.json" for n in ("boolq", "winogrande")}
    folder = cs.write_lm_eval_tasks(files, tmp_path)
    text = (folder / "astra_cs_boolq.yaml").read_text()
    assert repr(str(files["boolq"].resolve())) in text and "output_type: multiple_choice" in text
    assert (folder / "astra_cs_docs.py").exists()


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as lm-eval does (whole string, context prefix split off)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


@pytest.mark.parametrize("name", ["boolq", "ARC-Challenge", "winogrande"])
def test_lm_eval_loglik_accuracy_matches_a_direct_computation(tiny, tmp_path, name):
    model, tok = tiny
    limit = 6
    got = cs.loglik_accuracy(
        model, tok, {name: DATA_DIR / "commonsense" / name / "test.json"}, tmp_path, limit, 4
    )
    hits = []
    for row in commonsense_rows(name)[:limit]:
        doc = cs.lm_eval_doc(name, row)
        if name == "winogrande":
            scores = [continuation_logprob(model, tok, c, " " + doc["continuation"]) for c in doc["contexts"]]
        else:
            scores = [continuation_logprob(model, tok, doc["query"], " " + c) for c in doc["choices"]]
        hits.append(int(torch.tensor(scores).argmax()) == doc["gold"])
    assert got[name]["acc"] == pytest.approx(sum(hits) / limit)


# --- declared metrics -----------------------------------------------------------------------------
def test_math_evaluation_reports_only_declared_metrics_with_kinds(tiny):
    model, tok = tiny
    from astra.pipeline import compose_config

    task = make_task("metamath", tok, "task.eval_sets=[gsm8k]")
    metrics = task.evaluate(model, compose_config(["eval.limit=2", "eval.max_new_tokens=4"]).eval)
    specs = task.metric_specs(metrics)
    assert specs["gsm8k/accuracy"] == {"kind": "fraction", "higher_is_better": True}
    assert specs["gsm8k/n"]["kind"] == "count" and metrics["gsm8k/n"] == 2
    assert all(specs[k]["kind"] == "rate" for k in metrics if k.startswith("throughput/"))


@pytest.mark.parametrize(
    "name, metrics, kinds",
    [
        ("code", {"humaneval/pass@1": 0.1, "humaneval/n": 3.0, "throughput/humaneval/samples_per_s": 2.0},
         ["fraction", "count", "rate"]),
        ("commonsense", {"gen/boolq/accuracy": 0.5, "gen/avg_accuracy": 0.5, "gen/boolq/n": 4.0,
                         "loglik/boolq/acc": 0.5, "loglik/boolq/acc_norm": 0.5, "loglik/avg_acc": 0.5,
                         "commonsense/n_tasks": 1.0},
         ["fraction", "fraction", "count", "fraction", "fraction", "fraction", "count"]),
    ],
)  # fmt: skip
def test_nlg_metric_names_are_declared_by_their_task(tiny, name, metrics, kinds):
    _, tok = tiny
    specs = make_task(name, tok).metric_specs(metrics)
    assert [specs[k]["kind"] for k in metrics] == kinds
    with pytest.raises(ValueError, match="declared by no spec"):
        make_task(name, tok).metric_specs({"surprise/metric": 1.0})


@pytest.mark.parametrize("override", ["task.prompt_style=alpacca", "task.protocols=[loglikelihood]",
                                      "task.train_source=web"])  # fmt: skip
def test_nlg_choices_fail_at_compose_time(override):
    from hydra.errors import ConfigCompositionException

    from astra.pipeline import compose_config

    with pytest.raises(ConfigCompositionException):
        compose_config(["model=tiny-llama", "task=commonsense", override])
