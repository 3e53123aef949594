"""`align <verb>`: thin parsers that call the rooms below (main.py: the stages and tools; loop.py: `align run`)."""

from align.cli.main import main, recipe

__all__ = ["main", "recipe"]
