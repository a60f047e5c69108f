"""The trainer's causal-LM loss on labelled positions only equals `model(**batch).loss`, value and gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from astra.trainer import AstraTrainer, causal_lm_loss, causal_lm_parts

VOCAB = 97


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    for name, p in peft.named_parameters():  # B = 0 at init would make A's gradient vanish: perturb it
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """(4, 12) right-padded batch, labels -100 on a prompt prefix and on the padding (as the collator)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (length, prompt) in enumerate([(12, 3), (9, 5), (7, 2), (11, 10)]):
        ids[row, length:], mask[row, length:], labels[row, length:] = 0, 0, -100
        labels[row, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: torch.nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def direct_loss(model, batch, items=None):  # noqa: ANN001
    """Cross-entropy of every position's full-vocabulary logits in the model's dtype (fp64 stays fp64)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets, reduction="sum")
    return total / ((targets != -100).sum() if items is None else items)


def hf_loss(model, batch, items=None):  # noqa: ANN001
    """What the stock Trainer computes: the model's own loss (fp32 cross-entropy)."""
    return model(**batch, **({"num_items_in_batch": items} if items is not None else {})).loss


def assert_same(model, batch, chunk, items=None, rtol=1e-10, atol=1e-12, reference=direct_loss):  # noqa: ANN001
    ref_loss, ref_grads = loss_and_grads(model, lambda: reference(model, batch, items))
    parts = causal_lm_parts(model)
    assert parts is not None
    loss, grads = loss_and_grads(model, lambda: causal_lm_loss(parts, batch, items, chunk=chunk))
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_full_model_loss_and_gradients_equal_reference(chunk: int):
    """Every parameter, including the LM head tied to the embeddings, gets the reference gradient (fp64)."""
    assert_same(tiny_llama(), padded_batch(), chunk)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_lora_loss_and_gradients_equal_reference(chunk: int):
    model = lora(tiny_llama())
    model.train()  # dropout is 0; train mode as in the Trainer
    assert_same(model, padded_batch(), chunk)


def test_num_items_in_batch_divides_the_sum_as_the_model_does():
    """Gradient accumulation: the Trainer passes the token count of the whole accumulated batch."""
    assert_same(lora(tiny_llama()), padded_batch(), chunk=4, items=torch.tensor(100))


def test_fp32_equals_the_models_own_loss_within_rounding():
    assert_same(
        lora(tiny_llama(torch.float32)), padded_batch(), chunk=7, rtol=1e-5, atol=1e-6, reference=hf_loss
    )
    assert_same(tiny_llama(torch.float32), padded_batch(), chunk=7, items=50, rtol=1e-5, atol=1e-6,
                reference=hf_loss)  # fmt: skip


def test_other_models_are_not_taken_over():
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))  # fmt: skip
    assert causal_lm_parts(bert) is None


def train_steps(trainer_cls: type[Trainer], tmp_path, steps: int = 3) -> dict[str, torch.Tensor]:  # noqa: ANN001
    model = lora(tiny_llama(torch.float32))
    rows = [{k: v[i].tolist() for k, v in padded_batch(seed=s).items()} for s in range(3) for i in range(4)]
    collate = lambda feats: {k: torch.tensor([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
    args = TrainingArguments(output_dir=str(tmp_path / trainer_cls.__name__), max_steps=steps, learning_rate=1e-2,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", seed=0, logging_steps=1, disable_tqdm=True,
                             remove_unused_columns=False)  # fmt: skip
    trainer_cls(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_steps_match_the_stock_trainer(tmp_path):  # noqa: ANN001
    """Three optimiser steps with gradient accumulation land on the same adapter weights."""
    ours, stock = train_steps(AstraTrainer, tmp_path), train_steps(Trainer, tmp_path)
    for name in stock:
        torch.testing.assert_close(ours[name], stock[name], rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_never_runs_the_lm_head_module(tmp_path, monkeypatch):  # noqa: ANN001
    """The fast path is the one taken: the (batch, seq, vocab) logits of `lm_head(...)` are never formed."""
    calls = []
    original = LlamaForCausalLM.forward
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    train_steps(AstraTrainer, tmp_path, steps=1)
    assert calls == []


def test_gradient_checkpointing_defaults_on_for_causal_lms_only():
    from omegaconf import OmegaConf

    from astra.trainer import use_gradient_checkpointing

    cfg = lambda family, value=None: OmegaConf.create(  # noqa: E731
        {"task": {"family": family}, "trainer": {"gradient_checkpointing": value}}
    )
    assert use_gradient_checkpointing(cfg("math")) and not use_gradient_checkpointing(cfg("glue"))
    assert not use_gradient_checkpointing(cfg("math", False)) and use_gradient_checkpointing(
        cfg("glue", True)
    )


def test_gradient_checkpointing_leaves_loss_and_gradients_unchanged():
    model = lora(tiny_llama())
    model.train()
    ref_loss, ref_grads = loss_and_grads(
        model, lambda: causal_lm_loss(causal_lm_parts(model), padded_batch())
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = loss_and_grads(model, lambda: causal_lm_loss(causal_lm_parts(model), padded_batch()))
    assert torch.equal(loss, ref_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-12, atol=1e-14, msg=name)
