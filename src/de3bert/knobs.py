"""Knobs: dataclass fields that carry their help text (and choices, command-line flag) in their metadata.

A settings dataclass written with `knob` is the one place its knobs' names, defaults and help live:
the command line builds its flags from the fields (`apps/cli/options.py`), as Hugging Face's argument
parser does from its argument dataclasses.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def knob(default: Any = MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its default, and its help in the metadata with any of: choices (allowed values),
    flag (the command-line flag, when not --field-name) and cli=False (not a command-line option)."""
    return field(default=default, metadata={"help": help, **metadata})
