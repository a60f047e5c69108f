"""Astra initialisation (issue 3)."""
