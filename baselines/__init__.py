"""Baseline methods, one file each, registered into `astra.methods` under their config names."""

from baselines import corda, dora, eva, full_ft, lora, lora_ga, milora, olora, pissa  # noqa: F401
