"""Typed schemas of the Hydra config tree (`conf/`): they own every choice and every default.

Every group has a dataclass registered in Hydra's ConfigStore, so a misspelt key, a wrong type or a
choice outside its `StrEnum` fails when the config is composed (naming the valid values), before any
model is loaded. YAML files hold only the values that differ from these defaults, each with its
provenance. Groups whose options carry different fields (methods, tasks) extend a base schema: each
YAML names its schema in its defaults list (`- /schema/method/astra@_here_`), registered here or by the
module that owns it (see `register_schema`).

Run identity: a field declared with `not_in_signature(...)` cannot change a run's result (logging,
paths, caches, exact engine switches, workers); `run_identity` hashes the resolved config without
those fields into the run's signature.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from astra.prompts import PromptStyle
from astra.results import MetricKind, signature_of

SIGNATURE_KEY = "signature"  # dataclass field metadata: False = the field cannot change a run's result


def not_in_signature(default: Any = MISSING, **kwargs: Any) -> Any:
    """A schema field left out of the run signature (caches, exact engine switches, workers, logging)."""
    if default is not MISSING:
        kwargs["default"] = default
    return field(metadata={SIGNATURE_KEY: False}, **kwargs)


# --- choices (StrEnum: member name == value, so `cfg.x == "value"` and dict lookups by string work) ---
class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ModelSource(StrEnum):
    hub = "hub"  # `path` is a Hub id or a local folder
    package = "package"  # `path` is an installed Python package that ships a HF folder
    gguf_package = "gguf_package"  # a package shipping a GGUF file, converted once to a HF folder
    random = "random"  # a small randomly initialised model of `architecture`, seeded (tests)


class Architecture(StrEnum):
    bert = "bert"
    llama = "llama"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TaskFamily(StrEnum):
    """The `Task` subclass that reads and scores the task (astra.data.TASK_FAMILIES)."""

    glue = "glue"
    math = "math"
    code = "code"
    commonsense = "commonsense"


class TaskHead(StrEnum):
    """The model head a task trains (values are PEFT task types in lower case)."""

    seq_cls = "seq_cls"  # AutoModelForSequenceClassification, label per sequence
    causal_lm = "causal_lm"  # AutoModelForCausalLM, loss on response tokens


class TrainSource(StrEnum):
    auto = "auto"  # the paper's Hub set when reachable, else the local substitute
    hub = "hub"
    local = "local"


class Protocol(StrEnum):
    generation = "generation"  # generate, extract the answer
    loglik = "loglik"  # lm-eval log-likelihood of each choice


class CalibFormat(StrEnum):
    train_prompt = "train_prompt"  # the text the model is trained on (prompt + response)
    code_release = "code_release"  # authors' release: instruction + "\n### Response:" + output
    text = "text"  # plain concatenated fields


class Padding(StrEnum):
    longest = "longest"
    max_length = "max_length"  # release: padded to max_length with EOS


class Scheduler(StrEnum):
    """transformers.SchedulerType values (tests/test_config.py checks them against transformers)."""

    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"
    reduce_lr_on_plateau = "reduce_lr_on_plateau"
    cosine_with_min_lr = "cosine_with_min_lr"
    cosine_warmup_with_min_lr = "cosine_warmup_with_min_lr"
    warmup_stable_decay = "warmup_stable_decay"
    greedy = "greedy"


# transformers.training_args.OptimizerNames values (tests/test_config.py checks them against transformers)
_OPTIMIZERS = (
    "adamw_torch adamw_torch_fused adamw_torch_xla adamw_torch_npu_fused adafactor adamw_anyprecision "
    "adamw_torch_4bit adamw_torch_8bit ademamix sgd adagrad adamw_bnb_8bit adamw_8bit ademamix_8bit lion_8bit "
    "lion_32bit paged_adamw_32bit paged_adamw_8bit paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit "
    "paged_lion_8bit rmsprop rmsprop_bnb rmsprop_bnb_8bit rmsprop_bnb_32bit galore_adamw galore_adamw_8bit "
    "galore_adafactor galore_adamw_layerwise galore_adamw_8bit_layerwise galore_adafactor_layerwise lomo "
    "adalomo grokadamw schedule_free_radam schedule_free_adamw schedule_free_sgd apollo_adamw "
    "apollo_adamw_layerwise stable_adamw"
).split()
Optimizer = StrEnum("Optimizer", [(name, name) for name in _OPTIMIZERS])


class LoggerName(StrEnum):
    none = "none"
    wandb = "wandb"


class LoggerMode(StrEnum):
    offline = "offline"
    online = "online"  # needs WANDB_API_KEY
    disabled = "disabled"


class IfClaimed(StrEnum):
    """What a run does when another live process holds its signature's claim."""

    skip = "skip"  # leave it to the holder (the next pass of the sweep reruns it if the holder failed)
    wait = "wait"  # poll until the claim is released or stale, then skip (done) or run (holder failed)


class DataParallel(StrEnum):
    """Engine of a multi-process run (`torchrun`/`accelerate launch`; astra.distributed, docs/scaleout.md)."""

    ddp = "ddp"  # torch DistributedDataParallel
    fsdp = "fsdp"  # torch FSDP (full shard)
    deepspeed = "deepspeed"  # ZeRO-2, no offload (authors' configs/ds_config_zero2_no_offload.json)


class EvalBackend(StrEnum):
    hf = "hf"  # transformers `generate` (astra.evaluate.generation)
    vllm = "vllm"  # vLLM on the merged model, same prompts/stops/extraction (`pip install .[vllm]`, GPU)


# --- schemas ------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = ModelSource.hub
    path: str = ""
    gguf_file: str | None = None
    subfolder: str | None = None
    architecture: Architecture | None = None  # source=random only
    tokenizer_from: str | None = None  # random: tokenizer folder (repo-relative) or model config name
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 128
    dtype: DType = DType.float32
    target_modules: list[str] = field(default_factory=list)
    num_params: str = not_in_signature("")  # documentation only, e.g. "22.7M"


@dataclass
class MetricSpec:
    """One metric a task reports, as lm-eval's `metric_list` declares it.

    `name` is a metric name or an fnmatch pattern (`*/accuracy`) for families whose metric names carry
    the evaluation set; `higher_is_better` defaults by kind (`astra.results.DEFAULT_DIRECTION`).
    """

    name: str = MISSING
    kind: MetricKind = MetricKind.fraction
    higher_is_better: bool | None = None


@dataclass
class TaskConfig:
    name: str = MISSING
    family: TaskFamily = MISSING
    head: TaskHead = MISSING
    version: int = 1  # bump when prompts, extraction or metrics change
    max_length: int = 128
    train_limit: int | None = None  # use the first N shuffled training examples (CPU-scale runs)
    # training examples allowed to lose every label token to truncation (astra.validate; fails above it)
    max_unlabelled_fraction: float = not_in_signature(0.01)
    metrics: list[MetricSpec] = field(default_factory=list)  # what `evaluate` reports, kind and direction
    main_metric: str = MISSING  # the metric tables report for this task


@dataclass
class GlueTaskConfig(TaskConfig):
    family: TaskFamily = TaskFamily.glue
    head: TaskHead = TaskHead.seq_cls
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
    metrics: list[MetricSpec] = field(default_factory=lambda: [MetricSpec("accuracy")])
    main_metric: str = "accuracy"


@dataclass
class NLGTaskConfig(TaskConfig):
    """Instruction tuning (loss on the response) + generation / log-likelihood evaluation (astra.nlg)."""

    head: TaskHead = TaskHead.causal_lm
    max_length: int = 512  # MetaMath / PiSSA model_max_length
    hub_id: str = ""  # the paper's training set; tried first when train_source=auto
    hub_split: str = "train"
    hub_fields: dict[str, str] = field(default_factory=dict)  # instruction/input/output -> Hub column
    hub_filter: dict[str, str] = field(default_factory=dict)  # column -> value kept (CodeFeedback: lang)
    train_source: TrainSource = TrainSource.auto
    local_train: list[str] = field(default_factory=list)  # files under data_dir: the offline training set
    local_note: str = ""  # how the local files differ from the paper's set (recorded in dataset_used)
    eval_sets: list[str] = field(default_factory=list)  # names valid for the family (astra.nlg)
    protocols: list[Protocol] = field(default_factory=lambda: [Protocol.generation])
    prompt_style: PromptStyle = PromptStyle.alpaca
    max_new_tokens: int | None = None  # overrides eval.max_new_tokens for this task


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
    seq_len: int = 256  # assumed (the release's 512 is in conf/calib/release.yaml)
    batch_size: int = 1  # release: 1 (its hook reads output[0])
    seed: int = 42  # release: dataset/loader.py seed
    format: CalibFormat = CalibFormat.train_prompt
    path: str | None = None  # a user's own JSONL/text calibration file
    padding: Padding = Padding.longest
    drop_last_token: bool = False  # release: input_ids[:-1] (its loader shifts labels itself)


@dataclass
class TrainerConfig:
    lr: float = 2e-4  # assumed; paper NLG range 2e-5 .. 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    warmup_ratio: float = 0.03  # assumed (MetaMath / PiSSA scripts: 0.03)
    weight_decay: float = 0.0
    scheduler: Scheduler = Scheduler.cosine  # assumed (MetaMath / PiSSA scripts: cosine)
    max_grad_norm: float = 1.0
    optim: Optimizer = Optimizer.adamw_torch  # type: ignore[valid-type]
    eval_every: int = 0  # 0: evaluate at the end only
    bf16: bool = False
    # None: on for causal LMs (memory), off for classification; exact (recomputed with the same RNG state),
    # ~1.3-1.5x step time (astra.trainer.use_gradient_checkpointing)
    gradient_checkpointing: bool | None = not_in_signature(None)
    dataloader_num_workers: int = not_in_signature(0)
    save_model: bool = not_in_signature(False)
    # checkpoint every N optimisation steps (0: none) in the run's scratch folder; a rerun of the signature
    # resumes from the last verified one (astra/checkpoint.py). Exact resume: cannot change the result.
    save_every: int = not_in_signature(0)
    keep_checkpoints: bool = not_in_signature(False)  # False: removed once the run's result is written
    # effective-rank probes (astra/probes.py) at these optimisation steps (0 = at init; the final step is
    # added); empty = no probes. Probes only read the model: they cannot change the result.
    rank_probe_steps: list[int] = not_in_signature(default_factory=list)
    rank_probe_samples: int = not_in_signature(32)  # training examples the covariance probe uses
    # multi-process engine: all three are data parallel over the same global batch (`batch_size`, split
    # across ranks), i.e. the same optimisation up to the order of floating-point sums: not signed
    distributed: DataParallel = not_in_signature(DataParallel.ddp)


@dataclass
class EvalConfig:
    limit: int | None = None  # evaluate on the first N examples (CPU-scale runs)
    batch_size: int = 16
    max_new_tokens: int = 256
    allow_code_execution: bool = False  # HumanEval/MBPP completions run only in the sandbox when true
    timeout_s: float = 10.0
    num_samples: int = 1  # completions per code problem; > 1 samples (temperature) for pass@k, k <= n
    temperature: float = 0.8  # only when num_samples > 1
    pass_k: list[int] = field(default_factory=lambda: [1])
    memory_mb: int = 1024  # sandbox address-space limit per program
    workers: int = not_in_signature(2)  # sandbox programs run in parallel
    backend: EvalBackend = EvalBackend.hf  # generation engine; signed: vLLM's kernels may change outputs


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "astra"
    entity: str | None = None
    mode: LoggerMode = LoggerMode.offline
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    data_dir: str = "${oc.env:ASTRA_DATA_DIR,data}"  # layout of ../shared/data; missing files: the Hub
    results_dir: str = "${oc.env:ASTRA_RESULTS_DIR,results}"  # runs/, views/, claims/ (astra.results)
    cache_dir: str = "${oc.env:ASTRA_CACHE_DIR,${oc.env:HOME}/.cache/astra}"  # converted models, statistics
    output_dir: str = "${oc.env:ASTRA_OUTPUT_DIR,outputs}"  # scratch, wandb: <output_dir>/<sweep>/<sig>/


@dataclass
class SweepConfig:
    name: str = "adhoc"
    description: str = ""
    if_claimed: IfClaimed = IfClaimed.skip
    claim_timeout_s: float = 7 * 24 * 3600.0  # assumed: a claim older than this is stale, whatever its host
    claim_poll_s: float = 10.0  # if_claimed=wait: seconds between looks at the claim


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    task: Any = MISSING
    method: Any = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = not_in_signature(default_factory=LoggerConfig)
    paths: PathsConfig = not_in_signature(default_factory=PathsConfig)
    sweep: SweepConfig = not_in_signature(default_factory=SweepConfig)
    seed: int = 0
    device: Device = not_in_signature(Device.auto)


def register_schema(group: str, name: str, node: type) -> None:
    """Make `node` usable as `- /schema/<group>/<name>@_here_` in a YAML defaults list."""
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)


def register_all() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_schema("task", "glue", GlueTaskConfig)
    register_schema("task", "nlg", NLGTaskConfig)
    register_schema("method", "base", MethodConfig)


# --- run identity -------------------------------------------------------------------------------------
SchemaAt = Callable[[str], type | None]  # dotted path of a config node ("" = root) -> its dataclass


def unsigned_fields(schema: type | None) -> set[str]:
    """Names of the fields of dataclass `schema` marked `not_in_signature`."""
    if schema is None or not dataclasses.is_dataclass(schema):
        return set()
    return {f.name for f in dataclasses.fields(schema) if f.metadata.get(SIGNATURE_KEY, True) is False}


def unsigned_paths(tree: Mapping[str, Any], schema_at: SchemaAt, prefix: str = "") -> list[str]:
    """Dotted paths of `tree` whose schema field is marked `not_in_signature` (sorted, depth first)."""
    skip = unsigned_fields(schema_at(prefix.rstrip(".")))
    paths = []
    for key in sorted(tree):
        path = f"{prefix}{key}"
        if key in skip:
            paths.append(path)
        elif isinstance(tree[key], Mapping):
            paths += unsigned_paths(tree[key], schema_at, f"{path}.")
    return paths


def to_plain(config: Any) -> Any:
    """A JSON-able copy (DictConfig resolved, enums as their string values)."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True, enum_to_str=True)
    if isinstance(config, Mapping):
        return {str(k): to_plain(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [to_plain(v) for v in config]
    return str(config) if isinstance(config, StrEnum) else config


def run_identity(cfg: DictConfig) -> tuple[dict[str, Any], list[str], str]:
    """(resolved config, its unsigned paths, signature) of a composed run config."""

    def schema_at(path: str) -> type | None:
        node = OmegaConf.select(cfg, path) if path else cfg
        return OmegaConf.get_type(node) if isinstance(node, DictConfig) else None

    config = to_plain(cfg)
    unsigned = unsigned_paths(config, schema_at)
    return config, unsigned, signature_of(config, unsigned)


def static_schema_at(config: Mapping[str, Any], method_schema: Callable[[str], type | None]) -> SchemaAt:
    """`schema_at` for a stored (plain) config: RunConfig's field types, the method's registered schema,
    the task schema its fields reveal. Used to re-sign stored results (store migration)."""
    task = config.get("task") or {}
    roots: dict[str, type | None] = {
        "": RunConfig,
        "method": method_schema(str((config.get("method") or {}).get("name", ""))),
        "task": GlueTaskConfig if "glue_name" in task else NLGTaskConfig,
    }

    def schema_at(path: str) -> type | None:
        if path in roots:
            return roots[path]
        parent, _, leaf = path.rpartition(".")
        owner = schema_at(parent)
        if owner is None or not dataclasses.is_dataclass(owner):
            return None
        hint = typing.get_type_hints(owner).get(leaf)
        return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None

    return schema_at
