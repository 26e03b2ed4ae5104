"""Memory planning: exact parameter counts and per-device bytes (weights, caches, optimizer,
activations from ahead-of-time compiles) for a model on a mesh. CLI: `python -m nemojax.plan`."""

from nemojax.planning.counts import ParamCounts, count_parameters
from nemojax.planning.report import DEVICE_MEMORY, PlanRequest, format_plan, make_plan

__all__ = ["ParamCounts", "count_parameters", "DEVICE_MEMORY", "PlanRequest", "format_plan", "make_plan"]
