"""`astra-init`: compute an initialisation once (Astra or any adapter method) and export it for any trainer.

    astra-init model=smollm2-135m task=... method=astra|astra_code [calib.*] [method.rank=R] output_dir=DIR

writes `DIR/init_adapter/` (PEFT adapter), `DIR/residual/` (HF model folder holding W_res, + tokenizer)
and `DIR/astra_init.json` (resolved config, init time, per-layer spectrum summary). Load with
`astra.export.load_init(DIR, AutoModelFor...)`: the model computes exactly the base model's function.
A thin command over the pipeline (config composition, model, task, the one build path).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from astra.build import build_trainable
from astra.data import build_task
from astra.export import save_init
from astra.methods import get_method
from astra.models import load_model
from astra.pipeline import build_context, compose_config

USAGE = (
    "usage: astra-init model=NAME task=NAME method=astra|astra_code [calib.KEY=V ...] [method.KEY=V ...] "
    "output_dir=DIR"
)


def export_init(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Build the method's initialisation for `cfg` and write adapter, residual model and summary."""
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
