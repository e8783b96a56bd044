"""Glue for third-party tools that load models trained here (lmms-eval)."""
