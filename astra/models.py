"""Model and tokenizer loading: Hub ids, local folders, embedded packages, GGUF, random test models."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from astra.config import DType, ModelConfig, ModelSource, TaskHead


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (no dropout) inside the block; its previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
SOURCES = tuple(ModelSource)  # the schema's choices; checked again for configs built without it
DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}


def model_config(name: str) -> Any:
    """The `conf/model/<name>.yaml` entry, typed (used by random models to borrow a tokenizer)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no model config {path}; valid: {', '.join(valid)}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (its runtime deps may be absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except ImportError:  # a broken install reads as a missing one
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; run `make install` (it installs the embedded models)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _file_fingerprint(path: Path) -> str:
    """Cheap content key of a large file: size and sha256 of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: Path, cache_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint once into a plain HF folder under `cache_dir`, and reuse it.

    The Trainer refuses GGUF-quantised models, so training needs the dequantised copy. The folder is a
    verified cache entry (astra.artifacts): sealed by a manifest of sha256s written last, checked on every
    use, rebuilt with a warning naming its path when a file was changed or removed (corrupted weights,
    no tokenizer.json), written atomically (of two concurrent converters one wins, the other uses it).
    """
    from astra.artifacts import verified_folder

    target = Path(cache_dir) / "models" / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"

    def build(tmp: Path) -> None:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return verified_folder(target, build, required=CONVERTED_MODEL_FILES, what="converted model")


CONVERTED_MODEL_FILES = ("config.json", "tokenizer.json")  # weights: every file is in the manifest anyway


def resolve_model_dir(cfg: Any, cache_dir: str | Path) -> str:
    """A path or Hub id that `from_pretrained` can read for a non-random model."""
    if cfg.source == "hub":
        return cfg.path
    if cfg.source == "package":
        root = package_dir(cfg.path)
        return str(root / cfg.subfolder if cfg.subfolder else root)
    if cfg.source == "gguf_package":
        return str(convert_gguf(package_dir(cfg.path) / cfg.gguf_file, cache_dir))
    raise ValueError(f"model.source={cfg.source!r} has no folder; valid sources: {', '.join(SOURCES)}")


def tokenizer_dir(cfg: Any, cache_dir: str | Path) -> str:
    """Folder (or Hub id) of the tokenizer of `cfg`.

    A random model names its tokenizer in `tokenizer_from`: a tokenizer folder (absolute, or relative to
    the repository root, e.g. the tiny tokenizers under tests/assets/tokenizers), or the name of another
    model config whose tokenizer it borrows (e.g. `minilm`).
    """
    if cfg.source != "random":
        return resolve_model_dir(cfg, cache_dir)
    if not cfg.tokenizer_from:
        raise ValueError(
            f"model {cfg.name!r} is random and needs model.tokenizer_from (a folder or a model name)"
        )
    folder = REPO_ROOT / Path(cfg.tokenizer_from).expanduser()  # an absolute path stays as it is
    if folder.is_dir():
        return str(folder)
    if (CONF_DIR / "model" / f"{cfg.tokenizer_from}.yaml").exists():
        return resolve_model_dir(model_config(cfg.tokenizer_from), cache_dir)
    raise FileNotFoundError(
        f"model.tokenizer_from={cfg.tokenizer_from!r} is neither a tokenizer folder ({folder}) "
        f"nor a model config under {CONF_DIR / 'model'}"
    )


def load_tokenizer(cfg: Any, cache_dir: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg, cache_dir))
    if tokenizer.pad_token is None:  # LLaMA-family tokenizers: pad with EOS, as the authors do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_classification(task: Any) -> bool:
    """Whether `task` declares a sequence-classification head (`task.head`); a task object without a
    declared head (a test's stand-in for an instruction task) gets the causal-LM head."""
    return getattr(task, "head", TaskHead.causal_lm) == TaskHead.seq_cls


def random_config(cfg: Any, vocab_size: int, pad_token_id: int | None) -> Any:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        pad_token_id=pad_token_id,
    )
    if cfg.architecture == "bert":
        return BertConfig(max_position_embeddings=512, **common)
    if cfg.architecture == "llama":
        return LlamaConfig(
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=2048, **common
        )
    raise ValueError(f"model.architecture={cfg.architecture!r} for a random model; valid: bert, llama")


def load_model(
    cfg: Any, task: Any, cache_dir: str | Path, seed: int = 0
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, model identity) for `cfg` with the head the task needs."""
    if cfg.source not in SOURCES:
        raise ValueError(f"model.source={cfg.source!r}; valid sources: {', '.join(SOURCES)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    tokenizer = load_tokenizer(cfg, cache_dir)
    classifier = is_classification(task)
    head = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    head_kwargs: dict[str, Any] = {}
    if classifier:
        head_kwargs = {"num_labels": task.num_labels}
        if task.num_labels == 1:
            head_kwargs["problem_type"] = "regression"
    torch.manual_seed(seed)  # new heads (classifier) and random models are seeded
    if cfg.source == "random":
        config = random_config(cfg, len(tokenizer), tokenizer.pad_token_id)
        for key, value in head_kwargs.items():
            setattr(config, key, value)
        model = head.from_config(config).to(DTYPES[cfg.dtype])
        identity = (
            f"random:{cfg.architecture}:{cfg.hidden_size}x{cfg.num_layers}:v{len(tokenizer)}:seed{seed}"
        )
    else:
        path = resolve_model_dir(cfg, cache_dir)
        model = head.from_pretrained(path, dtype=DTYPES[cfg.dtype], **head_kwargs)
        identity = f"{cfg.name}:{cfg.path}"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, identity
