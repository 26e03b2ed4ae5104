"""Packed sequences: a row of several documents computes what each document computes alone
(attention, Mamba conv and SSM states, MTP), in the chunked scan, the sequential scan and the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.errors import ConfigError
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.model.documents import document_index
from nemojax.ops import attention as attention_ops
from nemojax.ops import dispatch
from nemojax.ops.ssd import ssd_chunked, ssd_sequential
from nemojax.train.losses import model_losses, token_counts

# Documents of each row: lengths chosen so starts fall inside chunks, on chunk edges (chunk 4), and a
# document shorter than the conv kernel (4).
ROW_LENGTHS = ((5, 2, 6), (4, 9))
T = 13

SMALL = dict(vocab_size=50, hidden_size=32, hybrid_override_pattern="M*EM-", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, mtp_hybrid_override_pattern="*E",
             num_nextn_predict_layers=1, compute_dtype="float32", param_dtype="float32")


def _spans(lengths):
    starts = np.cumsum((0,) + lengths[:-1])
    return [(int(s), int(s + n)) for s, n in zip(starts, lengths, strict=True)]


def _ids(lengths, first=1):
    """Document ids of a packed row (numbering starts at `first`; ids need not be consecutive)."""
    return np.concatenate([np.full(n, first + 3 * i) for i, n in enumerate(lengths)]).astype(np.int32)


def test_document_index_counts_starts():
    ids = jnp.asarray([[7, 7, 3, 3, 3, 9], [1, 2, 2, 0, 0, 5]])
    np.testing.assert_array_equal(document_index(ids), [[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 3]])


def _ssd_inputs(key, b, t, h=4, p=3, g=2, n=5):
    ks = jax.random.split(key, 6)
    return (jax.random.normal(ks[0], (b, t, h, p)), jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 1.0),
            -jnp.exp(jax.random.normal(ks[2], (h,))), jax.random.normal(ks[3], (b, t, g, n)),
            jax.random.normal(ks[4], (b, t, g, n)), jax.random.normal(ks[5], (b, h, p, n)))


def _alone_rows(v, s0, starts):
    """Every document of the packed rows alone, right-padded to T (dt = 0 there: the state is kept), with
    its initial state (the packed row's for a first document, zero otherwise)."""
    x, dt, bm, cm = v
    rows, inits = [], []
    for row, lengths in enumerate(ROW_LENGTHS):
        for i, (s, e) in enumerate(_spans(lengths)):
            rows.append([jnp.pad(a[row, s:e], [(0, T - (e - s))] + [(0, 0)] * (a.ndim - 2)) for a in (x, dt, bm, cm)])
            inits.append(s0[row] if i == 0 and starts else jnp.zeros_like(s0[row]))
    return [jnp.stack(parts) for parts in zip(*rows, strict=True)], jnp.stack(inits)


@pytest.mark.parametrize("chunk", [4, 5, 16])
def test_scans_restart_the_state_at_each_document(chunk):
    """Chunked and sequential scans of packed rows equal each document scanned alone (the first one
    continuing the initial state), outputs and final states."""
    x, dt, a, bm, cm, s0 = _ssd_inputs(jax.random.key(0), 2, T)
    doc = document_index(jnp.asarray(np.stack([_ids(lengths) for lengths in ROW_LENGTHS])))
    y, final = jax.jit(ssd_chunked, static_argnums=5)(x, dt, a, bm, cm, chunk, s0, doc)
    sequential = jax.jit(ssd_sequential, static_argnums=6)
    y_seq, final_seq = sequential(x, dt, a, bm, cm, s0, False, doc)
    np.testing.assert_allclose(y, y_seq, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, final_seq, rtol=1e-4, atol=1e-4)
    (xs, dts, bms, cms), inits = _alone_rows((x, dt, bm, cm), s0, starts=True)
    y_alone, final_alone = sequential(xs, dts, a, bms, cms, inits, False, None)
    n = 0
    for row, lengths in enumerate(ROW_LENGTHS):
        for s, e in _spans(lengths):
            np.testing.assert_allclose(y[row, s:e], y_alone[n, :e - s], rtol=1e-4, atol=1e-4)
            n += 1
        np.testing.assert_allclose(final[row], final_alone[n - 1], rtol=1e-4, atol=1e-4)
    # Without document starts the packed row would mix documents: the test can tell the difference.
    assert not np.allclose(y_seq, sequential(x, dt, a, bm, cm, s0, False, None)[0], atol=1e-3)


def test_dispatch_refuses_the_pallas_scan_for_packed_documents():
    x, dt, a, bm, cm, s0 = _ssd_inputs(jax.random.key(1), 2, T)
    doc = document_index(jnp.asarray(np.stack([_ids(lengths) for lengths in ROW_LENGTHS])))
    with pytest.raises(ConfigError, match="document starts"):
        dispatch.ssd_chunked(x, dt, a, bm, cm, 4, s0, kernels="pallas", doc_bt=doc)
    auto = jax.jit(lambda *v: dispatch.ssd_chunked(*v, 4, s0, kernels="auto", doc_bt=doc))
    y, final = auto(x, dt, a, bm, cm)
    y_ref, final_ref = jax.jit(ssd_sequential, static_argnums=6)(x, dt, a, bm, cm, s0, False, doc)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4)


def _mamba_states(cache, config):
    """Every Mamba layer's (conv, ssm) state in a cache, in layer order."""
    layers = cache["layers"]
    if config.scan_layers:
        return [(layers["mamba"]["conv"][i], layers["mamba"]["ssm"][i]) for i in range(layers["mamba"]["ssm"].shape[0])]
    return [(c["conv"], c["ssm"]) for c, kind in zip(layers, config.layer_types, strict=True) if kind == "mamba"]


def _left_padded(rows, pad_value):
    """Rows of lengths <= T, left-padded to T."""
    return jnp.asarray(np.stack([np.concatenate([np.full(T - len(r), pad_value, r.dtype), r]) for r in rows]))


def test_packed_rows_equal_their_documents_run_alone():
    """Logits, MTP logits (where token t+1 is in t's document) and the Mamba conv and SSM states after
    each document's end equal those of the document run alone (left-padded, which is exact)."""
    cfg = from_hf_config(SMALL)
    model = NemotronH(cfg)
    variables = jax.jit(lambda key: init_variables(cfg, key))(jax.random.key(0))
    forward = jax.jit(lambda ids, valid: model.apply(variables, ids, valid, init_cache(cfg, ids.shape[0], T),
                                                     method="forward"))
    mtp = jax.jit(lambda h, ids, valid: model.apply(variables, h[:, :-1], ids[:, 1:], valid[:, :-1],
                                                    method="mtp_forward")[0])
    ids = np.asarray(jax.random.randint(jax.random.key(1), (len(ROW_LENGTHS), T), 3, cfg.vocab_size), np.int32)
    segments = np.stack([_ids(lengths) for lengths in ROW_LENGTHS])
    spans = [(row, s, e) for row, lengths in enumerate(ROW_LENGTHS) for s, e in _spans(lengths)]

    # Each packed row up to each document's end, left-padded with id 0 (padding); the last is the whole row.
    prefix_ids = _left_padded([ids[row, :e] for row, _, e in spans], 0)
    prefix_segments = _left_padded([segments[row, :e] for row, _, e in spans], 0)
    logits, hidden, prefix_cache = forward(prefix_ids, prefix_segments)
    mtp_logits = mtp(hidden, prefix_ids, prefix_segments)
    # Every document alone (left-padded, bool mask), then the packed rows as one document each.
    alone_ids = _left_padded([ids[row, s:e] for row, s, e in spans] + list(ids), 0)
    alone_valid = _left_padded([np.ones(e - s, bool) for _, s, e in spans] + [np.ones(T, bool)] * len(ids), False)
    alone, alone_hidden, alone_cache = forward(alone_ids, alone_valid)
    alone_mtp = mtp(alone_hidden, alone_ids, alone_valid)

    for n, (row, s, e) in enumerate(spans):
        whole = [m for m, (r, _, end) in enumerate(spans) if r == row][-1]  # the row's full-length prefix
        for packed, packed_mtp in ((logits[whole, s:e], mtp_logits[whole, s:e - 1]),
                                   (logits[n, T - (e - s):], mtp_logits[n, T - (e - s):])):
            np.testing.assert_allclose(packed, alone[n, T - (e - s):], rtol=2e-4, atol=2e-4)
            np.testing.assert_allclose(packed_mtp, alone_mtp[n, T - (e - s):], rtol=2e-4, atol=2e-4)
    states = zip(_mamba_states(prefix_cache, cfg), _mamba_states(alone_cache, cfg), strict=True)
    for (conv, ssm), (conv_alone, ssm_alone) in states:
        np.testing.assert_allclose(conv, conv_alone[:len(spans)], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ssm, ssm_alone[:len(spans)], rtol=2e-4, atol=2e-4)
    # The same rows run as one document differ: the packed run really is kept apart.
    mixed = alone[len(spans):]
    assert not np.allclose(mixed[0, 5:7], logits[len(ROW_LENGTHS[0]) - 1, 5:7], atol=1e-3)


def _query_by_key_shapes(jaxpr, lengths, found):
    """Shapes in a jaxpr (and the jaxprs nested in it) with two axes whose sizes are sequence lengths."""
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _query_by_key_shapes(sub, lengths, found)
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if sum(size in lengths for size in shape) >= 2:
                found.add(shape)
    return found


def test_packed_training_keeps_no_query_by_key_array(monkeypatch):
    """The document test lives in the per-key-block causal mask: the gradient of a packed batch's loss
    (LM + MTP) builds no [b, t, s] array once attention goes over key blocks, where the one-block path
    (the control) does."""
    t = 37  # no model width equals a sequence length (t, t-1 for the MTP block)
    cfg = from_hf_config(dict(SMALL, hybrid_override_pattern="M*", mtp_hybrid_override_pattern="*"))
    model = NemotronH(cfg)
    variables = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))  # shapes only: nothing runs
    lengths = np.asarray([15, 22])
    segments = np.stack([np.repeat([1, 2], lengths), np.repeat([4, 9], lengths[::-1])]).astype(np.int32)
    batch = {"inputs": jnp.ones((2, t), jnp.int32), "targets": jnp.ones((2, t), jnp.int32),
             "loss_mask": jnp.ones((2, t), jnp.float32), "segments": jnp.asarray(segments)}

    def shapes():  # a new function each time: traced afresh under the current key-block settings
        loss = lambda p, b: model_losses(model, p, b, batch, token_counts(batch), 0.3, 0.0)[0]
        jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables.get("buffers", {})).jaxpr
        return _query_by_key_shapes(jaxpr, {t, t - 1}, set())

    assert (2, t, t) in shapes()  # one block of keys: the whole mask, as expected for short inputs
    monkeypatch.setattr(attention_ops, "MIN_QUERIES_FOR_BLOCKS", 1)
    monkeypatch.setattr(attention_ops, "KEY_BLOCK", 8)
    assert shapes() == set()
