"""The --stats record: throughput with compilation excluded, and speculative acceptance."""

from __future__ import annotations

from typing import Any

from nemojax.generate.engine import EngineStats


def stats_record(stats: EngineStats, num_draft_tokens: int = 0) -> dict[str, Any]:
    """prompts, generated_tokens, seconds (generation wall time), tokens_per_second, prefill_tokens_per_second,
    compile_seconds, and with speculation acceptance_rate (accepted / proposed drafts) and
    mean_accepted_length (tokens produced per verification: accepted drafts + 1)."""
    record: dict[str, Any] = {
        "prompts": stats.prompts,
        "generated_tokens": stats.generated_tokens,
        "seconds": stats.decode_seconds + stats.prefill_seconds,
        "tokens_per_second": stats.generated_tokens / max(stats.decode_seconds + stats.prefill_seconds, 1e-9),
        "prefill_tokens": stats.prefill_tokens,
        "prefill_tokens_per_second": stats.prefill_tokens / max(stats.prefill_seconds, 1e-9),
        "compile_seconds": stats.compile_seconds,
    }
    if num_draft_tokens:
        steps = max(stats.verify_steps, 1)
        record["num_draft_tokens"] = num_draft_tokens
        record["acceptance_rate"] = stats.accepted_drafts / (steps * num_draft_tokens)
        record["mean_accepted_length"] = (stats.accepted_drafts + stats.verify_steps) / steps
    return record
