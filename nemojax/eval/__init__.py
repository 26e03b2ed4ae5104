"""Evaluations of a checkpoint through the serving engine: `python -m nemojax.eval needle` (long-context
recall, RULER-style needles in a haystack built from the embedded corpus)."""
