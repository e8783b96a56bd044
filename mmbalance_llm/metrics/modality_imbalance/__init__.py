"""Metric script folder (loadable with evaluate.load by path)."""
