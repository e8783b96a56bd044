"""Evaluation: balance metrics, the evaluation pass, plots."""
