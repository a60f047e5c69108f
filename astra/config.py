"""Typed schemas of the Hydra config tree (`conf/`).

Every group has a dataclass registered in Hydra's ConfigStore, so a misspelt key or a wrong type
fails when the config is composed, before any model is loaded. Groups whose options carry
different fields (methods, tasks) extend a base schema: each YAML names its schema in its
defaults list (`- /schema/method/astra@_here_`), and the schema is registered here or by the
module that owns it (see `register_schema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SIGNATURE_KEY = "signature"  # dataclass field metadata: False = the field cannot change a run's result


def not_in_signature(default: Any = MISSING, **kwargs: Any) -> Any:
    """A schema field left out of the run signature (caches, exact engine switches, workers, logging)."""
    if default is not MISSING:
        kwargs["default"] = default
    return field(metadata={SIGNATURE_KEY: False}, **kwargs)


@dataclass
class ModelConfig:
    name: str = MISSING
    # hub: `path` is a Hub id or local folder; package: `path` is an installed Python package that
    # ships a HF folder; gguf_package: a package shipping a GGUF file, converted once to a HF folder;
    # random: a small randomly initialised model of `architecture`, seeded, for tests.
    source: str = "hub"
    path: str = ""
    gguf_file: str | None = None
    subfolder: str | None = None
    architecture: str | None = None  # bert | llama (source=random)
    tokenizer_from: str | None = None  # model config name whose tokenizer a random model borrows
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 128
    dtype: str = "float32"
    target_modules: list[str] = field(default_factory=list)
    num_params: str = ""  # documentation only, e.g. "22.7M"


@dataclass
class TaskConfig:
    name: str = MISSING
    family: str = MISSING  # glue | nlg
    version: int = 1  # bump when prompts, extraction or metrics change
    max_length: int = 128
    train_limit: int | None = None  # use the first N shuffled training examples (CPU-scale runs)


@dataclass
class GlueTaskConfig(TaskConfig):
    family: str = "glue"
    glue_name: str = MISSING  # folder under data_dir/glue and the Hub config name
    hub_id: str = "nyu-mll/glue"
    text_fields: list[str] = field(default_factory=list)  # one or two columns of the TSV
    label_field: str = "label"
    label_names: list[str] = field(default_factory=list)  # string labels, in id order
    num_labels: int = 2  # 1 = regression (STS-B)
    header: bool = True
    columns: list[str] = field(default_factory=list)  # column names when the file has no header
    dev_split: str = "dev"  # file stem of the evaluation split
    hub_dev_split: str = "validation"
    hub_text_fields: list[str] = field(default_factory=list)  # Hub column names, when they differ
    hub_label_field: str = "label"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    main_metric: str = "accuracy"


@dataclass
class NLGTaskConfig(TaskConfig):
    """Instruction tuning (loss on the response) + generation / log-likelihood evaluation (astra.nlg)."""

    family: str = MISSING  # math | code | commonsense
    max_length: int = 512  # paper / MetaMath: 512 tokens
    hub_id: str = ""  # the paper's training set; tried first when train_source=auto
    hub_split: str = "train"
    hub_fields: dict[str, str] = field(default_factory=dict)  # instruction/input/output -> Hub column
    hub_filter: dict[str, str] = field(default_factory=dict)  # column -> value kept (CodeFeedback: lang)
    train_source: str = "auto"  # auto (Hub, else local) | hub | local
    local_train: list[str] = field(default_factory=list)  # files under data_dir: the offline training set
    local_note: str = ""  # how the local files differ from the paper's set (recorded in dataset_used)
    eval_sets: list[str] = field(
        default_factory=list
    )  # gsm8k math500 math | humaneval mbpp | commonsense names
    protocols: list[str] = field(default_factory=lambda: ["generation"])  # commonsense: generation, loglik
    prompt_style: str = "alpaca"  # alpaca | llm_adapters
    max_new_tokens: int | None = None  # overrides eval.max_new_tokens for this task (commonsense: 32)
    main_metric: str = ""


@dataclass
class MethodConfig:
    name: str = MISSING
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | None = None  # None = the model's default targets
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> rank, as in PEFT
    lr: float | None = None  # explicit per-method learning-rate override (documented in the YAML)


@dataclass
class CalibConfig:
    n: int = 64  # paper: 64 calibration samples
    seq_len: int = 256
    batch_size: int = 1  # release: 1 (its hook reads output[0])
    seed: int = 42  # release: dataset/loader.py seed
    format: str = "train_prompt"  # train_prompt | code_release | text
    path: str | None = None  # a user's own JSONL/text calibration file
    padding: str = "longest"  # longest | max_length (release pads to max_length with EOS)
    drop_last_token: bool = False  # release: input_ids[:-1] (its loader shifts labels itself)


@dataclass
class TrainerConfig:
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    eval_every: int = 0  # 0: evaluate at the end only
    bf16: bool = False
    dataloader_num_workers: int = 0
    save_model: bool = False
    # effective-rank probes (astra/probes.py) at these optimisation steps (0 = at init; the final step is
    # added); empty = no probes
    rank_probe_steps: list[int] = field(default_factory=list)
    rank_probe_samples: int = 32  # training examples whose output activations the covariance probe uses


@dataclass
class EvalConfig:
    limit: int | None = None  # evaluate on the first N examples (CPU-scale runs)
    batch_size: int = 16
    max_new_tokens: int = 256
    allow_code_execution: bool = False
    timeout_s: float = 10.0
    num_samples: int = 1  # completions per code problem; > 1 samples (temperature) for pass@k, k <= n
    temperature: float = 0.8  # only when num_samples > 1
    pass_k: list[int] = field(default_factory=lambda: [1])
    memory_mb: int = 1024  # sandbox address-space limit per program
    workers: int = 2  # sandbox programs run in parallel


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "astra"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    data_dir: str = "${oc.env:ASTRA_DATA_DIR,data}"
    results_dir: str = "${oc.env:ASTRA_RESULTS_DIR,results}"
    cache_dir: str = "${oc.env:ASTRA_CACHE_DIR,${oc.env:HOME}/.cache/astra}"
    output_dir: str = "outputs"  # a run writes to <output_dir>/<sweep>/<signature>/


@dataclass
class SweepConfig:
    name: str = "adhoc"
    description: str = ""


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    task: Any = MISSING
    method: Any = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda


def register_schema(group: str, name: str, node: type) -> None:
    """Make `node` usable as `- /schema/<group>/<name>@_here_` in a YAML defaults list."""
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)


def register_all() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_schema("task", "glue", GlueTaskConfig)
    register_schema("task", "nlg", NLGTaskConfig)
    register_schema("method", "base", MethodConfig)
