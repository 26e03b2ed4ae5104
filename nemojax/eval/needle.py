"""The needle recall run: cases -> answers (an answer function, normally the serving engine) -> scores.

`run_needle(cases, answer)` asks `answer(cases)` for one generated text per case and scores each by
exact match (`nemojax.eval.scoring`); `summarize` gives recall per length and per (length, depth);
`format_table` prints them. `engine_answers` is the answer function of a real model: greedy decoding
through `nemojax.generate.Engine` (continuous batching, chunked prefill), `batch_size` prompts at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from nemojax.eval.haystack import NeedleCase
from nemojax.eval.scoring import answer_number, is_correct, recall

Answer = Callable[[Sequence[NeedleCase]], list[str]]


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: NeedleCase
    answer: str
    correct: bool


def run_needle(cases: Sequence[NeedleCase], answer: Answer) -> list[Outcome]:
    """Score `answer(cases)` (one text per case, in order)."""
    texts = answer(cases)
    if len(texts) != len(cases):
        raise ValueError(f"the answer function returned {len(texts)} answers for {len(cases)} cases")
    return [Outcome(c, t, is_correct(t, c.value)) for c, t in zip(cases, texts, strict=True)]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """{"recall": {length: r}, "recall_by_depth": {length: {depth: r}}, "cases": [...]} (keys as strings,
    so the result is JSON)."""
    lengths = sorted({o.case.length for o in outcomes})
    depths = sorted({o.case.depth for o in outcomes})
    by_length = {str(n): recall([o.correct for o in outcomes if o.case.length == n]) for n in lengths}
    by_depth = {str(n): {str(d): recall([o.correct for o in outcomes if (o.case.length, o.case.depth) == (n, d)])
                         for d in depths} for n in lengths}
    cases = [{"length": o.case.length, "depth": o.case.depth, "sample": o.case.sample, "key": o.case.key,
              "value": o.case.value, "prompt_tokens": len(o.case.prompt_ids), "needle_at": o.case.needle_at,
              "answer": o.answer, "answer_number": answer_number(o.answer), "correct": o.correct}
             for o in outcomes]
    return {"recall": by_length, "recall_by_depth": by_depth, "overall_recall": recall([o.correct for o in outcomes]),
            "cases": cases}


def format_table(summary: dict[str, Any]) -> str:
    """Recall per length (rows) and depth (columns), plus the length's mean."""
    by_depth = summary["recall_by_depth"]
    depths = list(next(iter(by_depth.values())).keys()) if by_depth else []
    header = ["length"] + [f"depth {float(d):.2f}" for d in depths] + ["recall"]
    rows = [[length] + [f"{by_depth[length][d]:.2f}" for d in depths] + [f"{summary['recall'][length]:.2f}"]
            for length in by_depth]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows])


def engine_answers(engine: Any, decode: Callable[[list[int]], str], max_new_tokens: int, batch_size: int) -> Answer:
    """Greedy answers from `engine` (a `nemojax.generate.Engine`), `batch_size` cases served together."""
    from nemojax.generate import Request

    def answer(cases: Sequence[NeedleCase]) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(cases), batch_size):
            group = cases[start:start + batch_size]
            requests = [Request(index=start + i, prompt_ids=c.prompt_ids, max_new_tokens=max_new_tokens,
                                temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=False,
                                thinking_budget=None) for i, c in enumerate(group)]
            texts.extend(decode(c.output_ids) for c in engine.generate(requests))
        return texts

    return answer
