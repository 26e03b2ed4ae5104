"""Continuous batching: requests that arrive while others run, in fewer slots than requests, give the
same tokens as each request served alone (greedy and seeded sampling, plain and MTP speculation, the
cache growing on the way); short requests finish before long ones that started earlier; a cancelled
request leaves its slot to a waiting one at once. With a prefix cache, hits at several depths (block
boundaries inside Mamba SSD chunks, chunked prefill) give the tokens and log-probabilities of
recomputation and prefill exactly the uncached rest; sessions sharing a system prompt under continuous
batching and MTP speculation are unchanged by it.

Every scheduler here has 2 slots and the same `max_len`, so all of them run the same few compiled
programs (the engine keeps them by shape); "alone" is the request as the only one in such a scheduler."""

import dataclasses

import jax
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.generate import Engine, Request, caches
from nemojax.generate.prefix_cache import PrefixCache
from nemojax.generate.scheduler import MIN_LENGTH, Scheduler, Ticket
from nemojax.model import NemotronH, init_variables
from nemojax.sharding import cache_axes

pytestmark = pytest.mark.xdist_group("scheduler")  # module fixtures share compiled programs
SMALL = dict(vocab_size=40, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, mtp_hybrid_override_pattern="*E",
             num_nextn_predict_layers=1, compute_dtype="float32", param_dtype="float32", eos_token_id=2)
SLOTS = 2
EOS = (2, 12)  # 12 is in the first arrival's greedy output (asserted): the end-of-sequence test has one to stop at
MAX_LEN = 72  # the longest request (20 + 50) needs more than the first cache length (MIN_LENGTH)


def request(index, prompt, max_new, **settings):
    fields = dict(index=index, prompt_ids=tuple(int(i) for i in prompt), max_new_tokens=max_new, temperature=0.0,
                  top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=True, thinking_budget=None)
    return Request(**dict(fields, **settings))


@pytest.fixture(scope="module")
def engines():
    config = from_hf_config(SMALL)
    model = NemotronH(config)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    options = dict(eos_ids=EOS, prefill_chunk=8)  # every request but one ignores end-of-sequence
    return Engine(model, variables, **options), Engine(model, variables, **options, num_draft_tokens=2)


@pytest.fixture(scope="module")
def alone(engines):
    """request -> (output ids, finish reason) of the request served alone by the plain engine."""
    plain, _ = engines
    scheduler = Scheduler(plain, SLOTS, MAX_LEN, segment_steps=4)
    served = {}

    def serve(request):
        if request not in served:
            ticket = scheduler.submit(Ticket(request))
            scheduler.run_until_idle()
            served[request] = ticket.output_ids, ticket.finish_reason
        return served[request]
    return serve


def arrivals():
    """Prompts of 3-20 tokens (up to three chunks), outputs of 3-50 tokens (past the first cache length);
    greedy rows and seeded sampling (temperature, min-p; the sort-based filters are the engine tests')."""
    rng = np.random.default_rng(0)
    shapes = [(20, 50), (3, 5), (9, 3), (14, 30), (5, 8), (11, 6)]
    settings = [{}, dict(temperature=0.9, seed=7), {}, dict(temperature=1.2, min_p=0.1, seed=1), {},
                dict(temperature=0.7, seed=3)]
    return [request(i, rng.integers(3, 40, p), n, **s) for i, ((p, n), s) in enumerate(zip(shapes, settings,
                                                                                             strict=True))]


def run_staggered(engine, requests, grows=True):
    """Submit two requests, then one more after every scheduler round; returns (tickets, finish order)."""
    scheduler = Scheduler(engine, SLOTS, MAX_LEN, segment_steps=4)
    assert scheduler.length == MIN_LENGTH
    tickets = [Ticket(r) for r in requests]
    for ticket in tickets[:2]:
        scheduler.submit(ticket)
    order, pending = [], tickets[2:]
    while scheduler.busy or pending:
        if pending:
            scheduler.submit(pending.pop(0))
        order += [t.request.index for t in scheduler.step()]
    assert (scheduler.length > MIN_LENGTH) == grows  # the cache grew while requests were running (or not)
    return tickets, order


def test_staggered_arrivals_equal_each_request_alone(engines, alone):
    plain, _ = engines
    tickets, order = run_staggered(plain, arrivals())
    for ticket in tickets:
        assert (ticket.output_ids, ticket.finish_reason) == alone(ticket.request), ticket.request.index
        assert len(ticket.output_ids) == ticket.request.max_new_tokens
    assert order.index(1) < order.index(0) and order.index(2) < order.index(0)  # short ones did not wait


def test_speculation_in_the_scheduler_equals_plain_greedy(engines, alone):
    """Greedy and sampled rows together: the greedy rows take the rejection-sampling path while sampled
    rows share their segment and the argmax path when only greedy rows run; either way they equal plain
    greedy decoding alone. (Outputs end within the first cache length: the growth is the plain test's,
    and a second length would double what speculation compiles.)"""
    _, speculative = engines
    room = MIN_LENGTH - 2 * speculative.k - 1
    reqs = [dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, room - len(r.prompt_ids)))
            for r in arrivals()]
    tickets, _ = run_staggered(speculative, reqs, grows=False)
    for ticket in tickets:
        assert len(ticket.output_ids) == ticket.request.max_new_tokens
        if ticket.request.temperature == 0:
            assert ticket.output_ids == alone(ticket.request)[0], ticket.request.index
    assert sum(t.verify_steps for t in tickets) > 0 and sum(t.accepted_drafts for t in tickets) > 0


def test_cancelled_request_leaves_its_slot_at_once(engines, alone):
    plain, _ = engines
    reqs = arrivals()
    scheduler = Scheduler(plain, SLOTS, MAX_LEN, segment_steps=4)
    long, other = scheduler.submit(Ticket(reqs[0])), scheduler.submit(Ticket(reqs[3]))
    short = scheduler.submit(Ticket(reqs[2]))
    updates = []
    short.on_update = lambda t: updates.append((len(t.output_ids), t.finish_reason))
    while not long.output_ids:
        scheduler.step()
    assert long.slot == 0 and other.slot == 1 and short.slot is None and not other.finished
    long.cancel()
    finished = scheduler.step()
    assert long in finished and long.finish_reason == "cancelled" and short.slot == 0
    assert len(long.output_ids) < long.request.max_new_tokens
    scheduler.run_until_idle()
    assert (short.output_ids, short.finish_reason) == alone(short.request)
    assert updates[-1] == (short.request.max_new_tokens, "length")
    assert (other.output_ids, other.finish_reason) == alone(other.request)


def test_stop_check_and_end_of_sequence_end_a_request(engines, alone):
    plain, _ = engines
    base = arrivals()[0]
    free, _ = alone(base)
    scheduler = Scheduler(plain, SLOTS, MAX_LEN, segment_steps=4)
    stopped = scheduler.submit(Ticket(base, stop=lambda ids: len(ids) >= 6))
    eos = scheduler.submit(Ticket(dataclasses.replace(base, index=1, ignore_eos=False)))
    scheduler.run_until_idle()
    assert stopped.finish_reason == "stop" and 6 <= len(stopped.output_ids) < len(free)
    assert stopped.output_ids == free[:len(stopped.output_ids)]
    cut = next(i for i, token in enumerate(free) if token in EOS) + 1
    assert eos.output_ids == free[:cut] and eos.finish_reason == "stop" and cut < len(free)


# ---------------------------------------------------------------- prefix cache
BLOCK = 6  # SMALL's SSD chunks are 4 tokens and its prefill chunks 8: most block boundaries fall inside both


def with_prefix(engine, budget=1 << 24):
    """A scheduler like the others, with its own prefix cache in blocks of BLOCK tokens."""
    scheduler = Scheduler(engine, SLOTS, MAX_LEN, segment_steps=4)
    scheduler.prefix = PrefixCache(budget, BLOCK, with_next_token=engine.k > 0)
    return scheduler


def serve_in_turn(scheduler, requests, logprobs=False):
    """Each request alone, one after the other: [(output ids, log-probs, cached tokens, prefilled tokens,
    accepted drafts)]."""
    results = []
    for r in requests:
        before = scheduler.engine.stats.prefill_tokens
        ticket = scheduler.submit(Ticket(r, logprobs=logprobs))
        scheduler.run_until_idle()
        results.append((ticket.output_ids, np.asarray(ticket.token_logprobs), ticket.cached_tokens,
                        scheduler.engine.stats.prefill_tokens - before, ticket.accepted_drafts))
    return results


def test_prefix_hits_at_several_depths_equal_recomputation(engines):
    """A conversation (44 tokens), its next turn (54: a hit at 42, inside an SSD chunk), and a prompt that
    leaves it after 20 tokens (a hit at 18): the same tokens and log-probabilities as without the cache,
    and exactly the uncached tokens prefilled. (Within the first cache length: one length compiles.)"""
    plain, _ = engines
    rng = np.random.default_rng(5)
    first = list(rng.integers(3, 40, 44))
    prompts = [first, first + list(rng.integers(3, 40, 10)), first[:20] + list(rng.integers(3, 40, 8))]
    reqs = [request(i, p, 7) for i, p in enumerate(prompts)]
    cached = with_prefix(plain)
    hits = serve_in_turn(cached, reqs, logprobs=True)
    reference = serve_in_turn(Scheduler(plain, SLOTS, MAX_LEN, segment_steps=4), reqs, logprobs=True)
    assert [h[2] for h in hits] == [0, 42, 18] and [r[2] for r in reference] == [0, 0, 0]
    assert [h[3] for h in hits] == [44, 54 - 42, 28 - 18] and [r[3] for r in reference] == [44, 54, 28]
    for hit, ref in zip(hits, reference, strict=True):
        assert hit[0] == ref[0]
        np.testing.assert_allclose(hit[1], ref[1], atol=1e-5)
    prefix = cached.prefix
    assert prefix.nbytes == sum(e.nbytes for e in prefix.entries.values()) <= prefix.budget_bytes
    assert prefix.stats.hits == 2 and prefix.stats.hit_tokens == 60


def test_sessions_sharing_a_system_prompt_under_continuous_batching(engines, alone):
    """One session warms the cache with a 26-token system prompt; three more (greedy and sampled, more
    than the slots) arrive together, each restores the prompt's 4 whole blocks and equals its request
    served alone without a cache."""
    plain, _ = engines
    rng = np.random.default_rng(6)
    system = list(rng.integers(3, 40, 26))
    reqs = [request(i, system + list(rng.integers(3, 40, n)), m, **s) for i, (n, m, s) in enumerate(
        [(8, 5, {}), (4, 9, {}), (12, 6, dict(temperature=0.8, seed=2)), (6, 12, {})])]
    scheduler = with_prefix(plain)
    tickets = [scheduler.submit(Ticket(reqs[0]))]
    scheduler.run_until_idle()
    tickets += [scheduler.submit(Ticket(r)) for r in reqs[1:]]
    scheduler.run_until_idle()
    assert [t.cached_tokens for t in tickets] == [0, 24, 24, 24]
    for ticket in tickets:
        assert (ticket.output_ids, ticket.finish_reason) == alone(ticket.request), ticket.request.index


def test_prefix_cache_with_speculation(engines, alone):
    """MTP speculation: the MTP block's entry at a block's last position depends on the token after the
    block, so a prompt that leaves the cached one right after a boundary gets the shallower hit; the
    outputs and accepted drafts equal the speculative engine's without a cache and plain greedy decoding,
    and the caches restored and prefilled equal those of a prefill from scratch."""
    _, speculative = engines
    rng = np.random.default_rng(7)
    first = list(rng.integers(3, 40, 20))
    other = first[:12] + [3 + (first[12] - 2) % 37] + list(rng.integers(3, 40, 7))  # leaves at position 12
    reqs = [request(i, p, 10) for i, p in enumerate([first, first + list(rng.integers(3, 40, 10)), other])]
    cached = with_prefix(speculative)
    hits = serve_in_turn(cached, reqs)
    reference = serve_in_turn(Scheduler(speculative, SLOTS, MAX_LEN, segment_steps=4), reqs)
    assert [h[2] for h in hits] == [0, 18, 6] and [h[3] for h in hits] == [20, 30 - 18, 20 - 6]
    for hit, ref, r in zip(hits, reference, reqs, strict=True):
        assert hit[0] == ref[0] == alone(r)[0] and hit[4] == ref[4]
    # The caches right after prefilling the next turn (a hit at 18 again): main stack and MTP block alike
    # equal a prefill from scratch (the drafts of a random MTP block are rarely accepted, so the outputs
    # alone would not show a wrong MTP cache).
    restored = prefilled_row(cached, dataclasses.replace(reqs[1], index=9))
    fresh = prefilled_row(Scheduler(speculative, SLOTS, MAX_LEN, segment_steps=4), reqs[1])
    assert int(restored["index"][0]) == 30 and int(restored["mtp"]["index"][0]) == 29  # no token after the last
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(fresh), strict=True):
        axes = cache_axes(path[-1].key, got.ndim)
        if "length" in axes:  # entries past the row's position are scratch
            written = np.arange(29 if path[0].key == "mtp" else 30)
            got, want = (np.take(a, written, axis=axes.index("length")) for a in (got, want))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def prefilled_row(scheduler, request):
    """The caches of the request's row once its prompt is in them (before any decoding step)."""
    ticket = scheduler.submit(Ticket(request))
    scheduler._admit()
    while not ticket.decoding:
        scheduler._prefill([ticket])
    row = caches.take_rows(scheduler.state["cache"], np.asarray([ticket.slot], np.int32))
    scheduler.rows[ticket.slot], ticket.slot = None, None  # leave the slot (the row is done on the device)
    return jax.device_get(row)
