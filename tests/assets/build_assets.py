"""Rebuild the committed test assets: tiny data (real rows) and two tiny tokenizers.

    python tests/assets/build_assets.py /path/to/shared/data

Data: the first rows of each staged file (../shared/data, see its SOURCES.md for provenance and
licenses), copied verbatim line by line (TSV, JSONL) or record by record (JSON arrays), so that unit
tests never need the full benchmarks. Nothing is invented.

Tokenizers (trained here with the `tokenizers` library on the same staged text, formatted with the
project's prompt templates so that the templates compress well):
- tiny-llama: byte-level BPE like SmolLM2/LLaMA-3 (exact decode round trip), EOS "<|im_end|>", no BOS
  added, padded with EOS by `astra.models.load_tokenizer`;
- tiny-bert: lower-cased WordPiece with BERT's [CLS] a [SEP] b [SEP] template and token type ids.
The data copy is deterministic; the WordPiece trainer breaks frequency ties in an order that can vary
between runs, so the committed tokenizer folders (not a rebuild) are what the tests and golden losses use.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from astra import prompts  # noqa: E402

# file under data_dir -> rows kept (TSV: data lines after the header; CoLA has none)
TSV = {
    "glue/mrpc/train.tsv": 64,  # tests train on 64 rows and evaluate 32
    "glue/mrpc/dev.tsv": 32,
    "glue/rte/train.tsv": 16,
    "glue/rte/dev.tsv": 16,
    "glue/sst2/train.tsv": 16,
    "glue/sst2/dev.tsv": 16,
    "glue/stsb/train.tsv": 16,
    "glue/stsb/dev.tsv": 16,
    "glue/qnli/dev.tsv": 16,
}
NO_HEADER = {"glue/cola/train.tsv": 16, "glue/cola/dev.tsv": 16}
JSONL = {"gsm8k/test.jsonl": 8, "math500/test.jsonl": 8, "mbpp/mbpp.jsonl": 16}
# GSM8K train: the first 24 rows whose question has at most 140 characters (196 rows scanned), so that a
# training prompt fits in the short `task.max_length` of CPU-scale runs (<= 81 tiny-llama tokens) and the
# pipeline's check that every example keeps a label token after truncation holds at max_length 96.
GSM8K_TRAIN, GSM8K_TRAIN_ROWS, GSM8K_MAX_QUESTION_CHARS = "gsm8k/train.jsonl", 24, 140
JSONL_GZ = {"math/test.jsonl.gz": 8, "humaneval/HumanEval.jsonl.gz": 6}
COMMONSENSE_TEST = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
COMMONSENSE_TRAIN = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
JSON_ARRAYS = {f"commonsense/{t}/test.json": 8 for t in COMMONSENSE_TEST}
JSON_ARRAYS |= {f"commonsense/{t}/train.json": 8 for t in COMMONSENSE_TRAIN}
JSON_ARRAYS["codealpaca/code_alpaca_2k.json"] = 24

# 2048: prompts come out about as long as with SmolLM2's 49k vocabulary on these templates (median
# 104 vs 92 tokens for a GSM8K Alpaca prompt), so tests' `task.max_length` settings keep responses.
LLAMA_VOCAB = 2048
BERT_VOCAB = 1024
LLAMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's specials
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def head_lines(src: Path, n: int, header: bool) -> bytes:
    """The header (if any) and the first `n` data lines, byte for byte (MRPC keeps its BOM)."""
    lines = src.read_bytes().split(b"\n")
    keep = lines[: n + int(header)]
    return b"\n".join(keep) + b"\n"


def copy_data(src_root: Path, dst_root: Path) -> None:
    for rel, n in {**TSV, **JSONL}.items():
        write(dst_root / rel, head_lines(src_root / rel, n, header=rel in TSV))
    lines = (src_root / GSM8K_TRAIN).read_bytes().split(b"\n")
    short = [line for line in lines if line and len(json.loads(line)["question"]) <= GSM8K_MAX_QUESTION_CHARS]
    write(dst_root / GSM8K_TRAIN, b"\n".join(short[:GSM8K_TRAIN_ROWS]) + b"\n")
    for rel, n in NO_HEADER.items():
        write(dst_root / rel, head_lines(src_root / rel, n, header=False))
    for rel, n in JSONL_GZ.items():
        with gzip.open(src_root / rel, "rb") as f:
            lines = f.read().split(b"\n")[:n]
        write(dst_root / rel, gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
    for rel, n in JSON_ARRAYS.items():
        rows = json.loads((src_root / rel).read_text(encoding="utf-8"))[:n]
        write(dst_root / rel, (json.dumps(rows, indent=1, ensure_ascii=False) + "\n").encode())


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def corpus(src_root: Path, limit: int = 400) -> list[str]:
    """Training text: instruction data in the prompt templates the tasks use, plus GLUE sentences."""
    texts: list[str] = []
    for row in [json.loads(x) for x in (src_root / "gsm8k/train.jsonl").read_text().splitlines()[:limit]]:
        texts.append(prompts.alpaca_prompt(row["question"]) + " " + row["answer"])
        texts.append(prompts.metamath_eval_prompt(row["question"]))
    for row in json.loads((src_root / "codealpaca/code_alpaca_2k.json").read_text())[:limit]:
        texts.append(prompts.alpaca_prompt(row["instruction"], row["input"]) + " " + row["output"])
    for task in COMMONSENSE_TRAIN:
        for row in json.loads((src_root / f"commonsense/{task}/train.json").read_text())[: limit // 4]:
            texts.append(prompts.alpaca_prompt(row["instruction"]) + " " + row["output"])
    for rel in ("glue/mrpc/train.tsv", "glue/sst2/train.tsv", "glue/rte/train.tsv"):
        texts += (src_root / rel).read_text(encoding="utf-8-sig").splitlines()[1:limit]
    return texts


def llama_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB,
        special_tokens=LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],  # LLaMA takes no token type ids
        clean_up_tokenization_spaces=False,  # exact decode round trip
        model_max_length=2048,
    )


def bert_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=BERT_VOCAB, special_tokens=BERT_SPECIALS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=512,
    )


def save(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    path = str(folder / "tokenizer.json")
    Tokenizer.from_file(path).save(path, pretty=False)  # one line: a third of the size


def main(src_root: Path) -> None:
    copy_data(src_root, HERE / "data")
    texts = corpus(src_root)
    save(llama_tokenizer(texts), HERE / "tokenizers" / "tiny-llama")
    save(bert_tokenizer(texts), HERE / "tokenizers" / "tiny-bert")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent.parent / "shared" / "data")
