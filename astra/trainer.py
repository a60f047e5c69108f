"""The shared trainer: `transformers.Trainer` for every method, with history and evaluation callbacks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from astra import distributed
from astra.checkpoint import CheckpointSealer, ResumeHistory, checkpoint_arguments, last_checkpoint
from astra.common import return_freed_memory
from astra.data import Task
from astra.models import eval_mode, model_device

log = logging.getLogger("astra.trainer")


class HistoryCallback(TrainerCallback):
    """Records loss, grad-norm and learning rate of every optimisation step (and mirrors to wandb)."""

    def __init__(self, sink: Callable[[dict[str, float]], None] | None = None):
        self.history: list[dict[str, float]] = []
        self.sink = sink

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (transformers API)
        if not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "loss": float(logs["loss"])}
        for src, dst in (("grad_norm", "grad_norm"), ("learning_rate", "lr")):
            if src in logs:
                row[dst] = float(logs[src])
        self.history.append(row)
        if self.sink:
            self.sink(row)


class PeriodicEvalCallback(TrainerCallback):
    """Runs the task's own evaluation every `every` steps (GLUE metrics, generation accuracy, ...)."""

    def __init__(self, task: Task, eval_cfg: Any, every: int, sink: Callable[[dict], None] | None = None):
        self.task, self.eval_cfg, self.every, self.sink = task, eval_cfg, every, sink
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            row = {"step": state.global_step, **self.task.evaluate(model, self.eval_cfg)}
            model.train()
            self.history.append(row)
            if self.sink:
                self.sink({f"eval/{k}": v for k, v in row.items()})


def use_gradient_checkpointing(cfg: Any) -> bool:
    """`trainer.gradient_checkpointing` when set; unset (None): on for causal LMs, off for GLUE.

    Exact (each block's forward is recomputed in backward with the same RNG state), ~1.3x the step time.
    Without it the saved activations of SmolLM2-135M at 16 x 512 tokens exceed 20 GB (MLP intermediates,
    attention, one dropout copy of every adapted layer's input); with it only the 30 block inputs
    (16 x 512 x 576 fp32 = 19 MB each) and one block's activations are held at a time.
    """
    value = cfg.trainer.get("gradient_checkpointing", None)
    return cfg.task.family != "glue" if value is None else bool(value)


def training_arguments(cfg: Any, output_dir: str) -> TrainingArguments:
    t = cfg.trainer
    lr = cfg.method.get("lr") or t.lr  # per-method override, documented in conf/method/<name>.yaml
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=distributed.per_device_batch(t.batch_size),  # batch_size: global
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,  # float < 1: a ratio of the total steps (transformers >= 5)
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=t.bf16,
        logging_steps=1,
        **checkpoint_arguments(cfg),  # trainer.save_every: checkpoints in output_dir (astra/checkpoint.py)
        eval_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
        disable_tqdm=False,
        remove_unused_columns=False,
        gradient_checkpointing=use_gradient_checkpointing(cfg),
        gradient_checkpointing_kwargs={"use_reentrant": False},  # no input-grad hook needed under PEFT
        **distributed.trainer_arguments(t.get("distributed", "ddp"), use_gradient_checkpointing(cfg)),
    )


# --- causal-LM loss on the labelled positions only -------------------------------------------------
IGNORE_INDEX = -100
# Model types whose CausalLM forward is exactly `logits = lm_head(decoder(...).last_hidden_state)` and whose
# loss is `ForCausalLMLoss` (no logit soft-capping or scaling), so the selected-position loss is the same
# number. Others fall back to `model(**batch).loss`.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})
LOSS_CHUNK_TOKENS = 1024  # rows of logits alive at once: 1024 x 49,152 fp32 = 200 MB for SmolLM2


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, lm_head) when `model` is a plain-head causal LM (see PLAIN_HEAD_MODEL_TYPES), else None."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not hasattr(base, "lm_head"):
        return None
    head = base.lm_head
    if type(head) is not torch.nn.Linear or getattr(config, "final_logit_softcapping", None):
        return None  # a PEFT-wrapped or scaled head: the generic path keeps its semantics
    return base.model, head


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) computed chunk by chunk; the (n, vocab) logits never exist at once.

    The gradient with respect to the logits, softmax - onehot, is formed in the forward pass for each
    chunk and immediately contracted with W (for dL/dh) and h (for dL/dW), so backward only scales the
    stored (n, d) and (vocab, d) gradients: the same arithmetic as autograd, without a recompute.
    Logits are computed in the model dtype and upcast to (at least) fp32, as `ForCausalLMLoss` does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: ANN001, ANN205 (autograd API)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)  # (c, vocab)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t)), t] -= 1.0
                grad = grad.to(hidden.dtype)  # autograd casts it back to the logits' dtype too
                if need_h:
                    grad_h[start : start + chunk] = grad @ weight
                if need_w:
                    grad_w += grad.T.to(acc) @ h.to(acc)
                if need_b:
                    grad_b += grad.to(acc).sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None


def causal_lm_loss(
    parts: tuple[torch.nn.Module, torch.nn.Linear],
    batch: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """`model(**batch).loss` of a plain-head causal LM, with the LM head applied to labelled positions only.

    batch: input_ids / attention_mask (B, T) and labels (B, T), -100 where ignored. Position t predicts
    labels[t + 1]; the mean runs over the labelled targets, or the sum is divided by
    `num_items_in_batch` when the Trainer passes it (gradient accumulation), as `ForCausalLMLoss` does.
    """
    decoder, head = parts
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    targets = batch["labels"][:, 1:].to(hidden.device)  # (B, T - 1)
    keep = targets != IGNORE_INDEX
    total = _LinearCrossEntropy.apply(hidden[:, :-1][keep], head.weight, head.bias, targets[keep], chunk)
    denom = keep.sum() if num_items_in_batch is None else num_items_in_batch
    return total / denom


class AstraTrainer(Trainer):
    """The shared `transformers.Trainer`; its causal-LM loss never forms logits of ignored positions.

    For a 135M model at batch 16 x 512 the full-vocabulary logits are 1.6 GB per fp32 copy and most of
    the rows (prompt, padding) carry label -100. Other models, label smoothing, a custom loss and
    multi-process runs keep the stock `compute_loss`.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        parts = causal_lm_parts(model)
        if (parts is None or return_outputs or "labels" not in inputs or "shift_labels" in inputs
                or self.label_smoother is not None or self.compute_loss_func is not None
                or self.accelerator.num_processes > 1):  # fmt: skip
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None  # as the model would see it
        return causal_lm_loss(parts, inputs, items)


@torch.no_grad()
def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Loss of `model` on one collated batch, in eval mode (no dropout)."""
    device = model_device(model)
    with eval_mode(model):
        return model(**{k: v.to(device) for k, v in batch.items()}).loss.float().item()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def train(model: torch.nn.Module, task: Task, cfg: Any, output_dir: str, callbacks: list) -> float:
    """Train with the shared Trainer; returns wall-clock seconds of `trainer.train()`."""
    return_freed_memory()
    args = training_arguments(cfg, output_dir)
    resume = last_checkpoint(output_dir)  # a previous attempt of this signature was interrupted
    histories = [ResumeHistory(c.history) for c in callbacks if isinstance(c, HistoryCallback)]
    trainer = AstraTrainer(
        model=model,
        args=args,
        train_dataset=task.train_dataset,
        data_collator=task.collator(),
        callbacks=[*callbacks, CheckpointSealer(), *histories],
    )
    if resume is not None:
        log.warning("resuming from %s", resume)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # trainer.save_model: the pipeline exports the run for plain PEFT (astra.export.export_trained)
    runtime = output.metrics.get("train_runtime", math.nan)
    return float(runtime)
