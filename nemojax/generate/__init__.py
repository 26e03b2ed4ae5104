"""Generation: batched prefill and decoding over KV/SSM caches, sampling, MTP speculative decoding."""

from nemojax.generate.engine import Completion, Engine, EngineStats
from nemojax.generate.requests import Defaults, Request

__all__ = ["Completion", "Engine", "EngineStats", "Defaults", "Request"]
