"""Command-line entry points: `nemojax-train` / `python train.py`, `nemojax-serve` / `python serve.py`
(`nemojax-plan` is `nemojax.plan`). Each parses flags and calls into the package."""
