"""Multi-process runs (`torchrun` / `accelerate launch`): thin helpers over `torch.distributed`.

No distributed engine lives here: training is data-parallel through `transformers.Trainer` (DDP, FSDP or
DeepSpeed ZeRO-2 via accelerate, `trainer.distributed`); this module only holds what the pipeline and the
statistics engine need around it (docs/scaleout.md):

- `setup()`: joins the process group the launcher describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR):
  gloo on CPU, nccl on GPU (one GPU per local rank); accelerate then reuses that group.
- rank 0 decides (skip / claim) and `broadcast_object`s the decision; rank 0 alone writes the result,
  logs and prints; a failed rank exits non-zero, which makes the launcher stop the others (rank 0 records
  `failed`: a gloo collective with a dead peer raises, and SIGTERM is an exit, see astra.pipeline).
- statistics are sums: `collect_statistics` shards the calibration batches across ranks (`shards`,
  `sharded_stream`) and the accumulators are all-reduced before they are finished (`reduce_accumulator`,
  `reduce_gradients`), so every rank finishes the identical statistic and computes the identical
  eigendecomposition (same input, same library, same device type); `check_identical_init` proves it per
  run (sha256 of every rank's adapter and residual weights).

Outside a launcher every helper is the single-process identity.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "distributed"
# the authors' configs/ds_config_zero2_no_offload.json, values "auto" filled in by the Trainer
DEEPSPEED_ZERO2 = CONF_DIR / "ds_config_zero2_no_offload.json"
TIMEOUT = dt.timedelta(hours=2)  # rank 0 evaluates alone while the others wait at most this long


class Engine(StrEnum):
    """The data-parallel engine of `trainer.distributed` (single process: all three are plain training)."""

    ddp = "ddp"  # torch DistributedDataParallel (the Trainer's default under torchrun)
    fsdp = "fsdp"  # torch FSDP, full shard, transformer blocks auto-wrapped
    deepspeed = "deepspeed"  # DeepSpeed ZeRO-2, no offload (the authors' config)


_state = {"sharding": False}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether a launcher started this process as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_submitit() -> bool:
    """In a submitit job of several tasks (SLURM `tasks_per_node` > 1, one task per GPU): export the
    torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from submitit's job environment."""
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or "1"
    if "WORLD_SIZE" in os.environ or int(tasks) < 2:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # LOCAL_RANK picks the GPU
    except (ImportError, RuntimeError):  # not a submitit job
        return False
    return True


def setup() -> bool:
    """Join the launcher's process group once (gloo on CPU, nccl with one GPU per local rank)."""
    from_submitit()
    if not launched() or dist.is_initialized():
        return dist.is_initialized()
    backend = "gloo"
    if torch.cuda.is_available() and os.environ.get("ASTRA_DEVICE", "") != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_decides(decide: Callable[..., Any], *args: Any) -> tuple[Any, bool]:
    """(rank 0's `decide(*args)` on rank 0 / None elsewhere, whether it returned something) on every rank:
    a decision taken once (skip-existing, claim) and shared, so ranks never disagree."""
    value = decide(*args) if is_main() else None
    return value, bool(broadcast_object(value is not None))


def per_device_batch(global_batch: int) -> int:
    """Examples per rank per step: `trainer.batch_size` is the global batch of one accumulation step, so a
    run means the same optimisation on any number of ranks (and keeps its signature)."""
    n = world_size()
    if global_batch % n:
        raise ValueError(f"trainer.batch_size={global_batch} is not divisible by the {n} ranks")
    return global_batch // n


def trainer_arguments(
    engine: str, gradient_checkpointing: bool, fsdp_allowed: bool = False
) -> dict[str, Any]:
    """Extra `TrainingArguments` of the data-parallel engine (none for DDP or a single process).
    FSDP is refused in the pipeline (`fsdp_allowed`: for callers that gather the parameters themselves)."""
    if world_size() == 1 or engine == Engine.ddp:
        return {}
    if engine == Engine.deepspeed:
        return {"deepspeed": str(DEEPSPEED_ZERO2)}
    if not fsdp_allowed:  # rank 0 evaluates alone on the model object: FSDP leaves it sharded
        raise NotImplementedError(
            "trainer.distributed=fsdp: the pipeline evaluates on rank 0 alone, which needs the full "
            "parameters that FSDP keeps sharded after training (not gathered yet); use ddp or deepspeed "
            "(ZeRO-2 keeps full parameters on every rank). See docs/scaleout.md"
        )
    return {  # FSDP: the Trainer's own integration (accelerate's FullyShardedDataParallelPlugin)
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "use_orig_params": True,
            "sync_module_states": True,
            "activation_checkpointing": gradient_checkpointing,
        },  # fmt: skip
    }


# --- sharded statistics --------------------------------------------------------------------------------
def shards(batches: list) -> bool:
    """Whether `collect_statistics` should shard these batches: several ranks, at least one batch each,
    and not already inside a sharded stream. With fewer batches than ranks every rank computes the whole
    (identical) statistic itself."""
    return world_size() > 1 and len(batches) >= world_size() and not _state["sharding"]


def sharded_stream(collect: Callable[..., Iterator], model: Any, targets: Any, kind: str, batches: list,
                   *args: Any) -> Iterator:  # fmt: skip
    """`collect` on this rank's batches (every world_size-th, from its rank on); the accumulators it
    finishes meanwhile are all-reduced (`reduce_accumulator`), so it yields the global statistic."""
    _state["sharding"] = True
    try:
        yield from collect(model, targets, kind, batches[rank() :: world_size()], *args)
    finally:
        _state["sharding"] = False


def _sum(tensors: list[torch.Tensor]) -> None:
    for t in tensors:  # one all-reduce per tensor, in the same order on every rank
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _sum_counts(counts: list[int], device: torch.device) -> list[int]:
    box = torch.tensor(counts, dtype=torch.float64, device=device)  # exact below 2**53
    dist.all_reduce(box, op=dist.ReduceOp.SUM)
    return [int(v) for v in box.tolist()]


def reduce_accumulator(acc: Any) -> None:
    """All-reduce the running sums and counts of one accumulator group of `astra.stats` in place, once.

    acc: a CovarianceAccumulator (second (d, d), first (d,)), a SharedInputAccumulator (dicts of
    ((d_in+1)^2, d_in+1) sums) or a dict name -> CovarianceAccumulator. No-op outside a sharded stream.
    """
    parts = list(acc.values()) if isinstance(acc, dict) else [acc]
    if not _state["sharding"] or all(getattr(part, "_reduced", False) for part in parts):
        return
    for part in parts:
        seconds = part.second.values() if isinstance(part.second, dict) else [part.second]
        firsts = part.first.values() if isinstance(part.first, dict) else [part.first]
        tensors = [*seconds, *firsts]
        _sum(tensors)
        part.tokens, part.samples = _sum_counts([part.tokens, part.samples], tensors[0].device)
        part._reduced = True


def reduce_gradients(sums: dict[str, torch.Tensor], counts: list[int]) -> list[int]:
    """All-reduce LoRA-GA's per-layer gradient sums (d_out, d_in) in place and the counts (batches,
    samples, tokens); identity outside a sharded stream."""
    if not _state["sharding"]:
        return counts
    tensors = list(sums.values())
    _sum(tensors)
    return _sum_counts(counts, tensors[0].device)


# --- equality of the initialisation across ranks --------------------------------------------------------
def init_digest(model: torch.nn.Module) -> str:
    """sha256 of every trainable parameter and every LoRA layer's base weight (the residual), by name."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad or ("base_layer" in name and name.endswith("weight")):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical_init(model: torch.nn.Module) -> str | None:
    """Fail unless every rank holds the bit-identical adapter and residual; the digest (None: 1 rank)."""
    if world_size() == 1:
        return None
    digests = [None] * world_size()
    dist.all_gather_object(digests, init_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks built different initialisations (sha256 per rank: {digests})")
    return digests[0]
