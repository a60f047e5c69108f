"""Export an initialisation or a trained run so that plain PEFT loads it.

- `save_init` / `load_init`: the initial adapter in PEFT format (`init_adapter/`, saved with
  `init_lora_weights=True` so loading never re-initialises) and a Hugging Face folder holding the
  residual weights W_res (`residual/`): together they compute exactly the base model's function.
- `convert_to_lora`: a trained adapter as a plain LoRA (rank 2r) against the *original* base weights
  via PEFT's `path_initial_model_for_weight_conversion`.
- `export_trained`: what `trainer.save_model=true` writes for a finished run.

The `astra-init` command that builds an initialisation and calls these lives in `astra.init_cli`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("astra.export")


def save_init(peft_model: Any, tokenizer: Any, out: Path) -> None:
    """`out/init_adapter` (PEFT, init_lora_weights=True) and `out/residual` (HF folder of W_res)."""
    out.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"]
    config.init_lora_weights = True  # loading must not re-initialise (the release does the same)
    peft_model.save_pretrained(out / "init_adapter")
    residual = peft_model.unload()  # base model with W_res in place of W, adapters removed
    residual.save_pretrained(out / "residual")
    tokenizer.save_pretrained(out / "residual")


def load_init(output_dir: str | Path, model_cls: Any, is_trainable: bool = True) -> Any:
    """The exported init: residual model + initial adapter (function = the original base model)."""
    from peft import PeftModel

    out = Path(output_dir)
    for sub in ("residual", "init_adapter"):
        if not (out / sub).is_dir():
            raise FileNotFoundError(f"{out / sub} not found: is {out} an `astra-init` output folder?")
    base = model_cls.from_pretrained(out / "residual")
    return PeftModel.from_pretrained(base, out / "init_adapter", is_trainable=is_trainable)


def convert_to_lora(trained: Any, output_dir: str | Path, init_adapter_dir: str | Path) -> Path:
    """Save a trained Astra adapter as a plain LoRA (rank 2r) on the original base weights.

    PEFT writes B' = [B, B0], A' = [A, -A0] so W + s B'A' = (W - s B0 A0) + s B A = W_res + s B A.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    out = Path(output_dir)
    trained.save_pretrained(out, path_initial_model_for_weight_conversion=str(init_adapter_dir))
    # PEFT's conversion keeps only lora_A/lora_B; the trained modules_to_save (a classification head)
    # must travel with the adapter, or loading it fails (and the head would be untrained).
    extra = {k: v for k, v in get_peft_model_state_dict(trained).items() if "lora_" not in k}
    if extra:
        weights = out / "adapter_model.safetensors"
        save_file({**load_file(str(weights)), **{k: v.contiguous() for k, v in extra.items()}}, str(weights),
                  metadata={"format": "pt"})  # fmt: skip
    return out


def save_init_adapter(peft_model: Any, out: str | Path) -> Path:
    """The adapter as initialised (before training), for `export_trained`'s conversion; the model is kept."""
    config = peft_model.peft_config["default"]
    config.init_lora_weights = True  # loading must not re-initialise (the release does the same)
    peft_model.save_pretrained(out)
    return Path(out)


def base_changed(peft_model: Any, original: torch.nn.Module) -> bool:
    """Whether the init rewrote any adapted layer's frozen weight (W_res != W: PiSSA, Astra, ...)."""
    from peft.tuners.lora import LoraLayer

    weights = dict(original.named_parameters())
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            if not torch.equal(base.detach().cpu(), weights[f"{name}.weight"].detach().to(base.dtype).cpu()):
                return True
    return False


def original_base(cfg: DictConfig, original: torch.nn.Module, tokenizer: Any, out: Path) -> str:
    """What `base_model_name_or_path` must name: the original model's Hub id or folder; a random (test)
    model, which exists nowhere on disk, is saved to `out/base` first."""
    from astra.models import resolve_model_dir

    if cfg.model.source != "random":
        return resolve_model_dir(cfg.model, cfg.paths.cache_dir)
    original.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    return str(out / "base")


def export_trained(
    peft_model: Any, tokenizer: Any, cfg: DictConfig, init_adapter_dir: str | Path, out: str | Path
) -> dict[str, str]:
    """Save a trained run so that plain PEFT loads it correctly: `out/adapter` is a LoRA on the ORIGINAL
    base model (its `base_model_name_or_path`). When the init rewrote the base weights (W_res), the adapter
    is converted (rank 2r, `convert_to_lora`), so no loader ever puts it on the wrong base. A run without
    adapters (full fine-tuning) saves the whole model to `out/model`. Returns {name: path}.

    Load: `PeftModel.from_pretrained(AutoModelFor...from_pretrained(<base_model>), <adapter>)`.
    """
    from astra.models import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # the run's config, for `python -m astra.evaluate_only <out>`
    (out / "run_config.json").write_text(json.dumps(OmegaConf.to_container(cfg, resolve=True), indent=1))
    if not hasattr(peft_model, "peft_config"):
        peft_model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        return {"model": str(out / "model")}
    original, _, _ = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)  # as the run did
    base = original_base(cfg, original, tokenizer, out)
    adapter = out / "adapter"
    if base_changed(peft_model, original):
        convert_to_lora(peft_model, adapter, init_adapter_dir)
    else:
        peft_model.save_pretrained(adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(adapter)
    return {"adapter": str(adapter), "base_model": base}
