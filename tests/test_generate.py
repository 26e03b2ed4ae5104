"""The generation engine: parity with transformers generate(), cached decoding vs full forwards,
batching equivalences, speculative decoding (greedy identity, rollback, rejection sampling) and
the thinking budget."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_checkpoint

import nemojax
from nemojax.config import from_hf_config
from nemojax.generate import Engine, Request, caches, sampling, speculative
from nemojax.generate.scheduler import Ticket
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.sharding import make_mesh
from nemojax.train.quick import fit_token_batches

pytestmark = pytest.mark.xdist_group("generate")  # module fixtures share compiled programs
THINK_END = 13
MAX_NEW = 12
SMALL = dict(vocab_size=40, hidden_size=32, hybrid_override_pattern="M*EM", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, mtp_hybrid_override_pattern="*E",
             num_nextn_predict_layers=1, compute_dtype="float32", param_dtype="float32", eos_token_id=2)


def request(index, ids, max_new=8, **overrides):
    fields = dict(index=index, prompt_ids=tuple(int(i) for i in ids), max_new_tokens=max_new, temperature=0.0,
                  top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=True, thinking_budget=None)
    fields.update(overrides)
    return Request(**fields)


@pytest.fixture(scope="module")
def small_model():
    config = from_hf_config(SMALL)
    return NemotronH(config), jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))


@pytest.fixture(scope="module")
def engines(small_model):
    """A plain and a speculative engine shared by the tests below (their compiled programs are reused)."""
    model, variables = small_model
    options = dict(eos_ids=(2,), think_end_id=THINK_END, prefill_chunk=8, min_batch=4)
    return Engine(model, variables, **options), Engine(model, variables, **options, num_draft_tokens=2)


def mixed_requests(max_new=MAX_NEW):
    """Prompts of different lengths (one and two prefill chunks) with different sampling settings."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(14, 40, n) for n in (3, 14, 9)]
    settings = [dict(top_k=5), dict(temperature=0.9, top_k=10, seed=7), dict(temperature=1.2, top_p=0.8, min_p=0.05)]
    return [request(i, p, max_new, **s) for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]


@pytest.mark.torch
@pytest.mark.parametrize("pattern,overrides", [("ME*-", {}), ("M*EM", {"moe_latent_size": None, "n_group": 1})])
def test_greedy_equals_transformers_generate(tmp_path, pattern, overrides):
    """A batch of equal-length prompts and single prompts of different lengths (one and two prefill
    chunks), EOS respected: the same ids as transformers' greedy generate().

    transformers' cached Mamba decoding does not clamp dt at time_step_min (its full forward does),
    so the checkpoint uses a negligible time_step_min for the two to agree."""
    import torch

    reference = make_checkpoint(tmp_path, pattern, seed=len(pattern) + len(overrides), time_step_min=1e-6,
                                **overrides)
    model, variables = nemojax.load_pretrained(tmp_path, dtype="float32", param_dtype="float32")
    engine = Engine(model, variables, eos_ids=(2,), prefill_chunk=8, min_batch=4)
    rng = np.random.default_rng(0)
    max_new = 10

    def hf_generate(ids):
        with torch.no_grad():
            out = reference.generate(torch.as_tensor(np.asarray(ids)), max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=2, pad_token_id=0)
        rows = []
        for row in out[:, len(ids[0]):].tolist():
            rows.append(row[:row.index(2) + 1] if 2 in row else row)
        return rows

    batch = rng.integers(3, model.config.vocab_size, (3, 6))
    ours = engine.generate([request(i, p, max_new, ignore_eos=False) for i, p in enumerate(batch)])
    assert [c.output_ids for c in ours] == hf_generate(batch.tolist())
    for length in (3, 13):
        prompt = rng.integers(3, model.config.vocab_size, (1, length))
        (ours,) = engine.generate([request(0, prompt[0], max_new, ignore_eos=False)])
        assert ours.output_ids == hf_generate(prompt.tolist())[0]
        assert ours.finish_reason == ("stop" if ours.output_ids[-1] == 2 else "length")


def test_cached_decoding_logits_equal_full_forward(small_model):
    """Left-padded chunked prefill, then one token at a time: the logits at every step equal a full
    forward over the unpadded sequence."""
    model, variables = small_model
    rng = np.random.default_rng(1)
    prompt, continuation = rng.integers(3, 40, 7), rng.integers(3, 40, 6)
    pad, chunk = 5, 4
    ids = np.concatenate([np.zeros(pad, np.int64), prompt])[None]
    valid = np.arange(ids.shape[1])[None] >= pad
    cache = init_cache(model.config, 1, 32)
    forward = jax.jit(lambda v, i, m, c: model.apply(v, i, m, c, method="forward"))
    for s in range(0, ids.shape[1], chunk):
        logits, _, cache = forward(variables, ids[:, s:s + chunk], valid[:, s:s + chunk], cache)
    steps = [logits[0, -1]]
    for token in continuation[:-1]:
        logits, _, cache = forward(variables, jnp.asarray([[token]]), None, cache)
        steps.append(logits[0, -1])
    full = jax.jit(model.apply)(variables, np.concatenate([prompt, continuation])[None])
    np.testing.assert_allclose(np.stack(steps), full[0, len(prompt) - 1:-1], rtol=1e-4, atol=1e-5)


def test_rollback_to_any_verified_position_continues_exactly(small_model):
    """Verify 4 tokens with per-position states, keep a different number in each row (1, 3, 4), and
    continue: logits equal the full forward of each row's kept sequence."""
    model, variables = small_model
    rng = np.random.default_rng(2)
    prompts = rng.integers(3, 40, (3, 6))
    verified = rng.integers(3, 40, (3, 4))
    keep_b = jnp.asarray([1, 3, 4])
    forward = jax.jit(lambda *a, **k: model.apply(*a, **k, method="forward"), static_argnames="per_position_states")
    cache = init_cache(model.config, 3, 32)
    _, _, cache = forward(variables, prompts, None, cache)
    start, before = cache["index"], cache["layers"]
    _, _, cache = forward(variables, verified, None, cache, per_position_states=True)
    cache = dict(cache, layers=caches.keep_positions(cache["layers"], before, model.config.layer_types, keep_b),
                 index=start + keep_b)
    nxt = rng.integers(3, 40, (3, 1))
    logits, _, _ = forward(variables, nxt, None, cache)
    sequences = [np.concatenate([prompts[r], verified[r, :int(keep_b[r])], nxt[r]]) for r in range(3)]
    padded = np.stack([np.pad(q, (11 - len(q), 0)) for q in sequences])
    full = jax.jit(model.apply)(variables, padded, padded > 0)  # left padding is exact; real ids are >= 3
    np.testing.assert_allclose(logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_rows_at_different_positions_equal_each_row_alone(small_model):
    """Right-padded chunks move each row by its real tokens (a row with none stays put), so rows of one
    cache sit at different positions; then a row reset for a new sequence and one step for all rows:
    every row's logits equal a full forward over its own sequence."""
    model, variables = small_model
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 40, n).tolist() for n in (3, 11, 6)]
    forward = jax.jit(lambda *a: model.apply(*a, method="forward"))
    cache = init_cache(model.config, 3, 24)
    for s in (0, 8):
        ids, valid = np.zeros((3, 8), np.int32), np.zeros((3, 8), bool)
        for r, p in enumerate(prompts):
            part = p[s:s + 8]
            ids[r, :len(part)], valid[r, :len(part)] = part, True
        _, _, cache = forward(variables, ids, valid, cache)
    assert cache["index"].tolist() == [3, 11, 6]
    # Row 1 starts again with a new 5-token prompt in the same cache (its old entries stay behind).
    cache = caches.reset_rows(cache, jnp.asarray([False, True, False]))
    prompts[1] = rng.integers(3, 40, 5).tolist()
    ids, valid = np.zeros((3, 8), np.int32), np.zeros((3, 8), bool)
    ids[1, :5], valid[1, :5] = prompts[1], True
    _, _, cache = forward(variables, ids, valid, cache)
    nxt = rng.integers(3, 40, (3, 1))
    logits, _, cache = forward(variables, nxt, None, cache)
    assert cache["index"].tolist() == [4, 6, 7]
    for r, p in enumerate(prompts):
        full = jax.jit(model.apply)(variables, np.asarray([p + [int(nxt[r, 0])]]))
        np.testing.assert_allclose(logits[r, -1], full[0, -1], rtol=1e-4, atol=1e-5)


def test_batch_of_mixed_lengths_equals_each_prompt_alone(engines):
    """Greedy and seeded sampling: a prompt's output does not depend on its batch companions."""
    plain, _ = engines
    reqs = mixed_requests()
    together = plain.generate(reqs)
    for r, out in zip(reqs, together, strict=True):
        assert plain.generate([r])[0].output_ids == out.output_ids
        assert len(out.output_ids) == MAX_NEW
    assert [c.output_ids for c in plain.generate(reqs)] == [c.output_ids for c in together]


def test_speculative_on_random_model_equals_plain_greedy(engines):
    """A random MTP block is rarely right, so nearly every step rejects and rolls back. An all-greedy
    batch takes the argmax path; in a batch with sampled rows the greedy row goes through rejection
    sampling with one-hot distributions and must still equal plain greedy."""
    plain, spec = engines
    greedy_reqs = [dataclasses.replace(r, temperature=0.0) for r in mixed_requests()]
    expected = [c.output_ids for c in plain.generate(greedy_reqs)]
    assert [c.output_ids for c in spec.generate(greedy_reqs)] == expected
    mixed = spec.generate(mixed_requests())
    assert mixed[0].output_ids == expected[0]
    assert all(len(c.output_ids) == MAX_NEW for c in mixed)
    assert spec.stats.verify_steps > 0


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_engine_on_a_mesh_equals_one_device(small_model, engines, speculative):
    """Variables and caches sharded over (data, tensor, expert) = (2, 2, 2), experts run expert-parallel:
    the same tokens as one device for prompts of different lengths, greedy and seeded sampling."""
    model, variables = small_model
    mesh = make_mesh(data=2, tensor=2, expert=2)
    engine = Engine(model, variables, eos_ids=(2,), think_end_id=THINK_END, prefill_chunk=8, min_batch=4,
                    num_draft_tokens=2 if speculative else 0, mesh=mesh)
    experts = engine.variables["params"]["backbone"]["layers_2"]["mixer"]["experts"]["up_proj"]
    assert experts.addressable_shards[0].data.shape[0] == SMALL["n_routed_experts"] // 2
    reqs = mixed_requests()
    want = [c.output_ids for c in engines[speculative].generate(reqs)]
    assert [c.output_ids for c in engine.generate(reqs)] == want
    segments = [executable for key, (executable, _) in engine._executables.items() if key[0] == "segment"]
    assert all(loop_collectives(s.as_text()) for s in segments)  # the partitioned loop communicates


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def loop_collectives(hlo: str) -> set[str]:
    """The collective operations in the decoding loop of a compiled program: in the bodies of the entry
    computation's while loops and every computation they call."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            name = "ENTRY" if header.group(1) else header.group(2)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    todo = re.findall(r"body=%?([\w.\-]+)", "\n".join(computations["ENTRY"]))
    assert todo, "no while loop in the entry computation"
    seen, found = set(), set()
    while todo:
        current = todo.pop()
        if current in seen or current not in computations:
            continue
        seen.add(current)
        text = "\n".join(computations[current])
        found |= {op for op in COLLECTIVES if re.search(rf" {op}(-start)?\(", text)}
        todo += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", text)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", text):
            todo += [branch.strip(" %") for branch in group.split(",")]
    return found


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_rows_split_over_data_decode_per_device(small_model, engines, speculative):
    """A mesh that only splits the rows (data=2): each device runs the decoding loop on its own rows
    with no communication inside it (on CPU the devices are threads: a batch decodes on two cores),
    and the tokens equal one device's, prompts held mid-prefill included (chunks of 8, prompts up to 14)."""
    model, variables = small_model
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    engine = Engine(model, variables, eos_ids=(2,), think_end_id=THINK_END, prefill_chunk=8, min_batch=4,
                    num_draft_tokens=2 if speculative else 0, mesh=mesh)
    reqs = mixed_requests()
    want = [c.output_ids for c in engines[speculative].generate(reqs)]
    assert [c.output_ids for c in engine.generate(reqs)] == want
    # Fewer slots than requests (one per device): segments end when a row finishes and requests wait.
    scheduler = engine.scheduler(2, max(len(r.prompt_ids) + r.max_new_tokens for r in reqs), segment_steps=4)
    tickets = [scheduler.submit(Ticket(r)) for r in reqs]
    scheduler.run_until_idle()
    assert [t.output_ids for t in tickets] == want
    segments = [executable for key, (executable, _) in engine._executables.items() if key[0] == "segment"]
    assert segments and all(loop_collectives(s.as_text()) == set() for s in segments)


def _train_counting_model(steps=40):
    """A tiny model trained (LM + MTP loss) on sequences that count up by a per-sequence stride, so its
    MTP block becomes a good drafter."""
    config = from_hf_config(dict(SMALL, hybrid_override_pattern="M*", vocab_size=32))
    model = NemotronH(config)
    rng = np.random.default_rng(0)

    def batch():
        start, stride = rng.integers(3, 32, (16, 1)), rng.integers(1, 3, (16, 1))
        return (start + stride * np.arange(24)[None]) % 29 + 3

    variables = fit_token_batches(model, init_variables(config, jax.random.key(1)), (batch() for _ in range(steps)),
                                  learning_rate=1e-2, mtp_loss_weight=1.0)
    return model, variables, batch()


def test_speculative_equals_plain_greedy_on_trained_model():
    model, variables, data = _train_counting_model()
    reqs = [request(i, data[i, :n], 16) for i, n in enumerate((5, 9, 6))]
    plain = Engine(model, variables, eos_ids=(2,), prefill_chunk=16, min_batch=4).generate(reqs)
    engine = Engine(model, variables, eos_ids=(2,), prefill_chunk=16, num_draft_tokens=3, min_batch=4)
    spec = engine.generate(reqs)
    assert [c.output_ids for c in spec] == [c.output_ids for c in plain]
    assert engine.stats.accepted_drafts > 0.3 * 3 * engine.stats.verify_steps  # a useful drafter (random: ~3%)
    # The rejection-sampling path, with many accepted drafts: the greedy row still equals plain greedy.
    sampled = engine.generate([reqs[0], dataclasses.replace(reqs[1], temperature=1.0, seed=3)])
    assert sampled[0].output_ids == plain[0].output_ids and len(sampled[1].output_ids) == 16


def test_rejection_sampling_keeps_the_target_distribution():
    """Drafts from q, accepted against p: the first emitted token is distributed as p_0, and after an
    acceptance the second as p_1."""
    vocab, k, n = 4, 2, 200_000
    key_p, key_q, key_d, key_a, key_r = jax.random.split(jax.random.key(0), 5)
    p = jax.nn.softmax(2 * jax.random.normal(key_p, (k + 1, vocab)))
    q = jax.nn.softmax(2 * jax.random.normal(key_q, (k, vocab)))
    drafts = jax.vmap(lambda kk: jax.random.categorical(kk, jnp.log(q)))(jax.random.split(key_d, n))
    count, nxt = speculative.accept(jax.random.split(key_a, n), jax.random.split(key_r, n), drafts,
                                    jnp.broadcast_to(q, (n, k, vocab)), jnp.broadcast_to(p, (n, k + 1, vocab)))
    tokens = np.asarray(speculative.emitted_tokens(drafts, count, nxt))
    first = np.bincount(tokens[:, 0], minlength=vocab) / n
    np.testing.assert_allclose(first, p[0], atol=5e-3)
    second = tokens[np.asarray(count) >= 1, 1]
    np.testing.assert_allclose(np.bincount(second, minlength=vocab) / len(second), p[1], atol=8e-3)


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = sampling.SamplingParams.create([1.0, 1.0, 1.0], [2, 0, 0], [1.0, 0.7, 1.0], [0.0, 0.0, 0.2])
    probs = np.asarray(sampling.token_probs(logits, params))
    np.testing.assert_allclose(probs[0], [0.625, 0.375, 0, 0], atol=1e-6)   # top-k 2
    np.testing.assert_allclose(probs[1], [0.625, 0.375, 0, 0], atol=1e-6)   # top-p 0.7
    np.testing.assert_allclose(probs[2], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)  # min-p 0.2
    greedy = sampling.SamplingParams.create([0.0], [0], [1.0], [0.0])
    assert np.asarray(sampling.token_probs(logits[:1], greedy)).tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("speculative", [False, True])
def test_thinking_budget_closes_the_think_block(engines, speculative):
    engine = engines[speculative]
    reqs = mixed_requests()
    budgets = (0, 3, 6)
    outs = engine.generate([dataclasses.replace(r, prompt_ids=reqs[1].prompt_ids, temperature=0.0,
                                                thinking_budget=b) for r, b in zip(reqs, budgets, strict=True)])
    free = engine.generate([dataclasses.replace(reqs[1], temperature=0.0)])[0].output_ids
    for budget, out in zip(budgets, outs, strict=True):
        closed = out.output_ids.index(THINK_END)
        assert closed <= budget and len(out.output_ids) == MAX_NEW  # the answer follows the closed block
        if THINK_END not in free[:budget]:
            assert closed == budget and out.output_ids[:budget] == free[:budget]


def test_engine_rejects_speculation_without_mtp(small_model):
    model, variables = small_model
    plain = dataclasses.replace(model.config, num_nextn_predict_layers=0, mtp_layer_types=())
    with pytest.raises(nemojax.errors.ConfigError):
        Engine(NemotronH(plain), variables, eos_ids=(2,), num_draft_tokens=2)


def test_caches_are_donated_from_prefill_into_decoding(engines):
    """Prefill writes into the slots' cache in place and the decode segments update it in place (each
    program donates the slot state it replaces): one copy of the cache, not two."""
    plain, _ = engines
    plain.generate(mixed_requests()[:1])
    by_name = {}
    for key, (executable, _) in plain._executables.items():
        by_name.setdefault(key[0], executable)
    for name in ("prefill", "segment"):
        args, _ = by_name[name].args_info
        cache = args[1]["cache"]  # the slot state follows the variables
        cache_bytes = sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(cache))
        assert cache_bytes > 0 and all(leaf.donated for leaf in jax.tree.leaves(cache)), name
        assert by_name[name].memory_analysis().alias_size_in_bytes >= cache_bytes, name
