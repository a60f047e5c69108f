"""`astra-init`: compute an Astra initialisation once and export it for any trainer.

    astra-init model=smollm2-135m task=... method=astra|astra_code [calib.*] [method.rank=R] output_dir=DIR

writes
- `DIR/init_adapter/`: the initial adapter in PEFT format, its config saved with
  `init_lora_weights=True` (as the release does) so loading it never re-initialises anything;
- `DIR/residual/`: a Hugging Face model folder holding the residual weights W_res (+ tokenizer);
- `DIR/astra_init.json`: the resolved config, init time and per-layer spectrum summary.

Load with `PeftModel.from_pretrained(AutoModel...from_pretrained(DIR/residual), DIR/init_adapter,
is_trainable=True)`: the model computes exactly the base model's function. After training,
`convert_to_lora` turns the trained adapter into a plain LoRA (rank 2r) against the *original* base
weights via PEFT's `path_initial_model_for_weight_conversion`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("astra.export")
USAGE = (
    "usage: astra-init model=NAME task=NAME method=astra|astra_code [calib.KEY=V ...] [method.KEY=V ...] "
    "output_dir=DIR"
)


def export_init(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Build the method's initialisation for `cfg` and write adapter, residual model and summary."""
    from astra.build import build_trainable
    from astra.data import build_task
    from astra.methods import get_method
    from astra.models import load_model
    from astra.pipeline import build_context

    out = Path(output_dir)
    method = get_method(cfg.method.name)
    if not method.trains_adapters:
        raise ValueError(f"method {cfg.method.name!r} trains no adapter: nothing to export")
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=cfg.seed)
    peft_model, report = build_trainable(model, method, build_context(cfg, task, model_id))
    save_init(peft_model, tokenizer, out)
    summary = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model_id": model_id,
        "init_seconds": report.init_seconds,
        "layers": report.layers,
        **report.extra,
    }
    (out / "astra_init.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


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


def split_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(output_dir, Hydra overrides) from `key=value` arguments."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        sys.exit(0)
    out = [a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")]
    if not out or not out[-1]:
        raise SystemExit(f"astra-init: output_dir=DIR is required\n{USAGE}")
    return out[-1], [a for a in argv if not a.startswith("output_dir=")]


def main(argv: list[str] | None = None) -> None:
    from astra.pipeline import compose_config

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    output_dir, overrides = split_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = compose_config(overrides)
    summary = export_init(cfg, output_dir)
    print(
        f"[astra-init] {cfg.method.name} on {cfg.model.name}: {len(summary['layers'])} layers, "
        f"init {summary['init_seconds']:.2f}s, calibration tokens {summary.get('calib_tokens_used')}, "
        f"cache {summary.get('cache')}\n  adapter : {Path(output_dir) / 'init_adapter'}\n"
        f"  residual: {Path(output_dir) / 'residual'}"
    )


if __name__ == "__main__":
    main()
