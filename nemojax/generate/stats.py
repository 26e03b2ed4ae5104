"""The --stats record: throughput with compilation excluded, and speculative acceptance."""

from __future__ import annotations

from typing import Any

from nemojax.generate.engine import EngineStats


def stats_record(stats: EngineStats, num_draft_tokens: int = 0) -> dict[str, Any]:
    """prompts, generated_tokens, seconds (generation wall time), tokens_per_second, prefill_tokens (prompt
    tokens run through the model), cached_tokens (prompt tokens restored from the prefix cache instead),
    prefill_tokens_per_second, prefill_seconds (prompt chunks and prefix-cache copies), decode_seconds,
    ttft_seconds (mean, submission to first token read back), decode_ms_per_token (decode time per token
    after each request's first), compile_seconds, and with speculation acceptance_rate (accepted / proposed
    drafts) and mean_accepted_length (tokens produced per verification: accepted drafts + 1)."""
    decoded = stats.generated_tokens - stats.first_tokens  # each request's first token comes from its prefill
    record: dict[str, Any] = {
        "prompts": stats.prompts,
        "generated_tokens": stats.generated_tokens,
        "seconds": stats.decode_seconds + stats.prefill_seconds,
        "tokens_per_second": stats.generated_tokens / max(stats.decode_seconds + stats.prefill_seconds, 1e-9),
        "prefill_tokens": stats.prefill_tokens,
        "cached_tokens": stats.cached_tokens,
        "prefill_tokens_per_second": stats.prefill_tokens / max(stats.prefill_seconds, 1e-9),
        "prefill_seconds": stats.prefill_seconds,
        "decode_seconds": stats.decode_seconds,
        "ttft_seconds": stats.ttft_seconds / max(stats.first_tokens, 1),
        "decode_ms_per_token": 1000 * stats.decode_seconds / max(decoded, 1),
        "compile_seconds": stats.compile_seconds,
    }
    if num_draft_tokens:
        steps = max(stats.verify_steps, 1)
        record["num_draft_tokens"] = num_draft_tokens
        record["acceptance_rate"] = stats.accepted_drafts / (steps * num_draft_tokens)
        record["mean_accepted_length"] = (stats.accepted_drafts + stats.verify_steps) / steps
    return record
