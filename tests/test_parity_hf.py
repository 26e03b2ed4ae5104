"""Tier 1: logits equal the `transformers` NemotronH reference on random small checkpoints."""

import jax
import numpy as np
import pytest
from hf_reference import make_checkpoint, reference_logits

import nemojax
from nemojax.errors import CheckpointError

pytestmark = pytest.mark.torch


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


CASES = {
    # name: (pattern, config overrides, batch, length)
    "latent_groups": ("ME*-", {}, 2, 21),               # chunk 8 does not divide 21; n_group 2
    "no_latent": ("M*EM", {"moe_latent_size": None, "n_group": 1}, 2, 16),
    "groups4_topk2": ("EM*", {"n_group": 4, "topk_group": 2, "n_routed_experts": 16, "chunk_size": 5}, 3, 13),
    "long_multi_chunk": ("M-*E", {"chunk_size": 16}, 1, 50),
    "no_norm_topk": ("E-M", {"norm_topk_prob": False, "num_experts_per_tok": 2}, 2, 9),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pattern, overrides, batch, length = CASES[case]
    ref = make_checkpoint(tmp_path, pattern, seed=len(case), **overrides)
    model, variables = nemojax.load_pretrained(tmp_path, dtype="float32", param_dtype="float32")
    assert model.config.layer_types == tuple(
        {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}[c] for c in pattern)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, length))
    ours = jax.jit(model.apply)(variables, ids)
    assert ours.shape == (batch, length, model.config.vocab_size)
    assert rel_err(ours, reference_logits(ref, ids)) < 1e-4


def test_left_padding_matches_unpadded_reference(tmp_path):
    """Left padding with `valid` gives the same logits as the unpadded prompt (HF run unpadded)."""
    ref = make_checkpoint(tmp_path, "M*EM-", seed=3)
    model, variables = nemojax.load_pretrained(tmp_path, dtype="float32", param_dtype="float32")
    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (1, 11))
    padded = np.concatenate([np.zeros((1, 5), ids.dtype), ids], axis=1)
    valid = np.concatenate([np.zeros((1, 5), bool), np.ones((1, 11), bool)], axis=1)
    ours = model.apply(variables, padded, valid)[:, 5:]
    assert rel_err(ours, reference_logits(ref, ids)) < 1e-4


def test_bf16_load_runs_close_to_reference(tmp_path):
    ref = make_checkpoint(tmp_path, "ME*-", seed=5)
    model, variables = nemojax.load_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 12))
    ours = model.apply(variables, ids)
    assert rel_err(ours, reference_logits(ref, ids)) < 5e-2


def test_checkpoint_errors_list_every_problem(tmp_path):
    make_checkpoint(tmp_path, "ME*-", seed=1)
    from nemojax.checkpoint.safetensors_io import SafetensorsDir, save_file
    st = SafetensorsDir(tmp_path)
    tensors = {k: np.array(st.read(k)) for k in st.keys()}
    del tensors["backbone.layers.0.mixer.D"]
    tensors["backbone.layers.2.mixer.q_proj.weight"] = np.zeros((3, 3), np.float32)
    tensors["backbone.layers.9.mixer.bogus"] = np.zeros((2,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        nemojax.load_pretrained(tmp_path, dtype="float32")
    text = str(err.value)
    assert "backbone.layers.0.mixer.D" in text and "missing" in text
    assert "backbone.layers.9.mixer.bogus" in text and "unexpected" in text
    assert "q_proj.weight: (3, 3), expected (64, 64)" in text


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    """nemojax -> published layout -> transformers gives our logits back."""
    from transformers import NemotronHForCausalLM

    make_checkpoint(tmp_path / "a", "ME*-", seed=7)
    model, variables = nemojax.load_pretrained(tmp_path / "a", dtype="float32")
    nemojax.checkpoint.hf.save_pretrained(tmp_path / "b", model.config, variables)
    ref = NemotronHForCausalLM.from_pretrained(tmp_path / "b").float().eval()
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, 10))
    assert rel_err(model.apply(variables, ids), reference_logits(ref, ids)) < 1e-4
