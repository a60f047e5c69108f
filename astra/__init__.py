"""Astra: activation-space tail-eigenvector LoRA initialisation, and the shared experiment machinery."""

__version__ = "0.1.0"
