"""Baseline methods, one file each, registered into `astra.methods` under their config names."""

from baselines import full_ft, lora  # noqa: F401
