"""Re-score a saved run or an exported model without training: `python -m astra.evaluate_only`.

    python -m astra.evaluate_only <result.json | saved-model folder> [eval.limit=N ...] [--out FILE]

- `<results_dir>/runs/<sig>.json`: a run saved with `trainer.save_model=true` (the result names its
  saved model in `run_info.artifacts`); its stored config says the task and evaluation settings.
- a folder written by the pipeline's export (`adapter/` + `run_config.json`, or `model/` for full
  fine-tuning), or by `astra-init` (`init_adapter/` + `residual/` + `astra_init.json`).
Dotted overrides (`eval.limit=8`, `eval.batch_size=4`, `paths.data_dir=...`) change the evaluation.
Prints the metrics as JSON and writes them with the per-sample outputs (generation tasks) to `--out`
(default: `<folder>/evaluation.json` and `<folder>/evaluation.samples.jsonl`). The model is loaded the way a user
would load it: plain transformers + PEFT from the saved files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def saved_run(target: Path) -> tuple[Path, dict[str, Any]]:
    """(saved-model folder, run config) of a result file or a saved-model folder."""
    if target.is_file():
        from astra.results import read_result

        result = read_result(target)
        arts = result.run_info.artifacts
        saved = arts.get("adapter") or arts.get("model")
        if not saved:
            raise SystemExit(f"{target}: the run saved no model (rerun it with trainer.save_model=true)")
        return Path(saved).parent, result.run_info.config
    for name in ("run_config.json", "astra_init.json"):
        if (target / name).is_file():
            data = json.loads((target / name).read_text())
            return target, data.get("config", data) if name == "astra_init.json" else data
    raise SystemExit(f"{target}: neither a result JSON nor a saved-model folder (no run_config.json)")


def model_class(cfg: DictConfig) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from astra.models import is_classification

    return AutoModelForSequenceClassification if is_classification(cfg.task) else AutoModelForCausalLM


def load_saved_model(folder: Path, cfg: DictConfig, head_kwargs: dict[str, Any]) -> torch.nn.Module:
    """The saved model, loaded with plain transformers + PEFT."""
    from peft import PeftConfig, PeftModel

    from astra.models import DTYPES

    cls, dtype = model_class(cfg), DTYPES[cfg.model.dtype]
    if (folder / "model").is_dir():  # full fine-tuning
        return cls.from_pretrained(folder / "model", dtype=dtype, **head_kwargs)
    if (folder / "adapter").is_dir():  # a LoRA on the original base (export_trained)
        base_path = PeftConfig.from_pretrained(folder / "adapter").base_model_name_or_path
        base = cls.from_pretrained(base_path, dtype=dtype, **head_kwargs)
        return PeftModel.from_pretrained(base, folder / "adapter")
    if (folder / "init_adapter").is_dir():  # astra-init: residual + initial adapter
        base = cls.from_pretrained(folder / "residual", dtype=dtype, **head_kwargs)
        return PeftModel.from_pretrained(base, folder / "init_adapter")
    raise SystemExit(f"{folder}: no model/, adapter/ or init_adapter/ folder")


def tokenizer_folder(folder: Path) -> Path:
    for sub in ("adapter", "model", "residual"):
        if (folder / sub / "tokenizer_config.json").is_file():
            return folder / sub
    raise SystemExit(f"{folder}: no saved tokenizer")


def evaluate_saved(
    target: str | Path, overrides: list[str] = ()
) -> tuple[dict[str, float], list[dict], Path]:
    """(metrics, per-sample outputs, saved-model folder) of a saved run, re-scored now."""
    from transformers import AutoTokenizer

    from astra.data import build_task
    from astra.pipeline import load_registry

    load_registry()  # task families
    folder, config = saved_run(Path(target))
    cfg = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(list(overrides)))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=cfg.seed)
    head: dict[str, Any] = {}
    if model_class(cfg).__name__.endswith("Classification"):  # as astra.models.load_model builds the head
        head = {"num_labels": cfg.task.num_labels}
        if cfg.task.num_labels == 1:
            head["problem_type"] = "regression"
    model = load_saved_model(folder, cfg, head)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = "cuda" if cfg.get("device") != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    metrics = task.evaluate(model, cfg.eval)
    return metrics, list(task.__dict__.get("samples", [])), folder


def main(argv: list[str] | None = None) -> None:
    from astra.artifacts import save_samples

    parser = argparse.ArgumentParser(prog="python -m astra.evaluate_only", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="a result JSON (runs/<sig>.json) or a saved-model folder")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.limit=8")
    parser.add_argument("--out", help="metrics JSON to write (default: <saved folder>/evaluation.json)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    metrics, samples, folder = evaluate_saved(args.target, args.overrides)
    out = Path(args.out) if args.out else folder / "evaluation.json"
    saved = save_samples(samples, out.with_name(out.stem + ".samples.jsonl"))
    out.write_text(json.dumps({"target": str(args.target), "metrics": metrics,
                               "samples": str(saved) if saved else None}, indent=1))  # fmt: skip
    print(json.dumps(metrics, indent=1))
    print(f"[astra] evaluation written to {out}" + (f", per-sample outputs to {saved}" if saved else ""))


if __name__ == "__main__":
    main()
