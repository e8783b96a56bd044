"""Small process-level helpers (console noise, thread counts); no heavy imports."""
