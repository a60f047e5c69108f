"""The shared trainer: `transformers.Trainer` for every method, with history and evaluation callbacks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from astra.data import Task
from astra.models import eval_mode, model_device


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


def training_arguments(cfg: Any, output_dir: str) -> TrainingArguments:
    t = cfg.trainer
    lr = cfg.method.get("lr") or t.lr  # per-method override, documented in conf/method/<name>.yaml
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,  # float < 1: a ratio of the total steps (transformers >= 5)
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=t.bf16,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
        disable_tqdm=False,
        remove_unused_columns=False,
    )


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
    args = training_arguments(cfg, output_dir)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task.train_dataset,
        data_collator=task.collator(),
        callbacks=callbacks,
    )
    output = trainer.train()
    if cfg.trainer.save_model:
        trainer.save_model(output_dir)
    runtime = output.metrics.get("train_runtime", math.nan)
    return float(runtime)
