"""Continuous batching: requests that arrive while others run, in fewer slots than requests, give the
same tokens as each request served alone (greedy and seeded sampling, plain and MTP speculation, the
cache growing on the way); short requests finish before long ones that started earlier; a cancelled
request leaves its slot to a waiting one at once."""

import dataclasses

import jax
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.generate import Engine, Request
from nemojax.generate.scheduler import Scheduler, Ticket
from nemojax.model import NemotronH, init_variables

pytestmark = pytest.mark.xdist_group("scheduler")  # module fixtures share compiled programs
SMALL = dict(vocab_size=40, hidden_size=32, hybrid_override_pattern="M*EM", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, mtp_hybrid_override_pattern="*E",
             num_nextn_predict_layers=1, compute_dtype="float32", param_dtype="float32", eos_token_id=2)


def request(index, prompt, max_new, **settings):
    fields = dict(index=index, prompt_ids=tuple(int(i) for i in prompt), max_new_tokens=max_new, temperature=0.0,
                  top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=True, thinking_budget=None)
    return Request(**dict(fields, **settings))


@pytest.fixture(scope="module")
def engines():
    config = from_hf_config(SMALL)
    model = NemotronH(config)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    options = dict(eos_ids=(2,), prefill_chunk=8)
    return Engine(model, variables, **options), Engine(model, variables, **options, num_draft_tokens=2)


def arrivals():
    """Prompts of 3-20 tokens (up to three chunks), outputs of 3-40 tokens (past the first cache length)."""
    rng = np.random.default_rng(0)
    shapes = [(20, 40), (3, 5), (9, 3), (14, 30), (5, 8), (11, 6)]
    settings = [{}, dict(temperature=0.9, top_k=10, seed=7), {}, dict(temperature=1.2, top_p=0.8, seed=1), {},
                dict(temperature=0.7, min_p=0.1, seed=3)]
    return [request(i, rng.integers(3, 40, p), n, **s) for i, ((p, n), s) in enumerate(zip(shapes, settings,
                                                                                             strict=True))]


def run_staggered(engine, requests, slots=2, segment_steps=4):
    """Submit two requests, then one more after every scheduler round; returns (tickets, finish order)."""
    scheduler = Scheduler(engine, slots, max_len=64, segment_steps=segment_steps)
    tickets = [Ticket(r) for r in requests]
    for ticket in tickets[:2]:
        scheduler.submit(ticket)
    order, pending = [], tickets[2:]
    while scheduler.busy or pending:
        if pending:
            scheduler.submit(pending.pop(0))
        order += [t.request.index for t in scheduler.step()]
    assert scheduler.length > 64  # the cache grew from its first length while requests were running
    return tickets, order


def test_staggered_arrivals_equal_each_request_alone(engines):
    plain, _ = engines
    reqs = arrivals()
    tickets, order = run_staggered(plain, reqs)
    for ticket in tickets:
        alone = plain.generate([ticket.request])[0]
        assert ticket.output_ids == alone.output_ids and ticket.finish_reason == "length", ticket.request.index
        assert len(ticket.output_ids) == ticket.request.max_new_tokens
    assert order.index(1) < order.index(0) and order.index(2) < order.index(0)  # short ones did not wait


def test_speculation_in_the_scheduler_equals_plain_greedy(engines):
    plain, speculative = engines
    reqs = [dataclasses.replace(r, temperature=0.0) for r in arrivals()]
    tickets, _ = run_staggered(speculative, reqs)
    for ticket in tickets:
        assert ticket.output_ids == plain.generate([ticket.request])[0].output_ids, ticket.request.index
    assert sum(t.verify_steps for t in tickets) > 0
    # Sampled rows next to greedy ones take the rejection-sampling path; the greedy rows are unchanged.
    mixed, _ = run_staggered(speculative, arrivals())
    for ticket, greedy in zip(mixed, tickets, strict=True):
        assert len(ticket.output_ids) == ticket.request.max_new_tokens
        if ticket.request.temperature == 0:
            assert ticket.output_ids == greedy.output_ids


def test_cancelled_request_leaves_its_slot_at_once(engines):
    plain, _ = engines
    reqs = arrivals()
    scheduler = Scheduler(plain, 1, max_len=64, segment_steps=4)
    long, short = scheduler.submit(Ticket(reqs[0])), scheduler.submit(Ticket(reqs[2]))
    updates = []
    short.on_update = lambda t: updates.append((len(t.output_ids), t.finish_reason))
    scheduler.step()
    scheduler.step()
    assert long.slot == 0 and short.slot is None and len(long.output_ids) > 0
    long.cancel()
    finished = scheduler.step()
    assert long in finished and long.finish_reason == "cancelled" and short.slot == 0
    scheduler.run_until_idle()
    assert short.output_ids == plain.generate([short.request])[0].output_ids
    assert updates[-1] == (short.request.max_new_tokens, "length")


def test_stop_check_and_end_of_sequence_end_a_request(engines):
    plain, _ = engines
    base = arrivals()[0]
    free = plain.generate([base])[0].output_ids
    scheduler = Scheduler(plain, 2, max_len=64, segment_steps=4)
    stopped = scheduler.submit(Ticket(base, stop=lambda ids: len(ids) >= 6))
    eos = scheduler.submit(Ticket(dataclasses.replace(base, index=1, ignore_eos=False)))
    scheduler.run_until_idle()
    assert stopped.finish_reason == "stop" and 6 <= len(stopped.output_ids) < len(free)
    assert stopped.output_ids == free[:len(stopped.output_ids)]
    cut = free.index(2) + 1 if 2 in free else len(free)
    assert eos.output_ids == free[:cut] and eos.finish_reason == ("stop" if 2 in free else "length")
