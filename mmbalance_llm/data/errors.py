"""The data-contract error, in a module of its own so that the CLI can catch it without importing torch."""
from __future__ import annotations


class DataError(ValueError):
    """The data breaks the dataset contract; the message names split, column and row."""
