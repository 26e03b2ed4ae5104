"""load_pretrained and load_model on bad checkpoints: every failure is a nemojax error naming the file,
field or tensor (never a KeyError or an mmap error), published extra config fields load with a warning
naming them, and a workdir whose newest checkpoint cannot be restored falls back to the one before."""

import json
import os
import shutil
import struct
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import nemojax
from nemojax.checkpoint.hf import save_pretrained
from nemojax.checkpoint.orbax import load_model, write_config
from nemojax.config import from_hf_config
from nemojax.errors import CheckpointError, NemojaxError, NemojaxWarning
from nemojax.model import init_variables

pytestmark = pytest.mark.xdist_group("bad_input_load")
TINY = dict(vocab_size=64, hidden_size=16, hybrid_override_pattern="M*E", num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=4, n_groups=1,
            chunk_size=8, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
            moe_shared_expert_intermediate_size=8, eos_token_id=2, compute_dtype="float32")
ST = "model.safetensors"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    config = from_hf_config(TINY)
    save_pretrained(directory, config, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0)))
    return directory


@pytest.fixture
def copy(hf_dir, tmp_path):
    target = tmp_path / "hf"
    shutil.copytree(hf_dir, target)
    return target


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_header(path, edit):
    """Rewrite the safetensors header with `edit(header) -> dict or bytes`, keeping the data bytes."""
    blob = (path / ST).read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + size]), blob[8 + size:]
    new = edit(header)
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    (path / ST).write_bytes(struct.pack("<Q", len(new)) + new + data)


def first(header):
    return min(k for k in header if k != "__metadata__")


def set_entry(field, value):
    def edit(header):
        header[first(header)][field] = value
        return header
    return edit


CASES = [  # (case, corruption of the copy, words the error must hold)
    ("config.json not JSON", lambda p: (p / "config.json").write_text("{oops"), ["config.json"]),
    ("config.json a list", lambda p: (p / "config.json").write_text("[1]"), ["config.json"]),
    ("config.json not UTF-8", lambda p: (p / "config.json").write_bytes(b'{"a": "\xff"}'), ["config.json"]),
    ("pattern a number", lambda p: edit_config(p, hybrid_override_pattern=5), ["hybrid_override_pattern"]),
    ("pattern letter unknown", lambda p: edit_config(p, hybrid_override_pattern="MX*"), ["hybrid_override_pattern"]),
    ("eos id a string", lambda p: edit_config(p, eos_token_id="x"), ["eos_token_id"]),
    ("eos id negative", lambda p: edit_config(p, eos_token_id=-5), ["eos_token_id"]),
    ("vocab a float", lambda p: edit_config(p, vocab_size=64.5), ["vocab_size"]),
    ("vocab beyond int32", lambda p: edit_config(p, vocab_size=3 * 10**9), ["vocab_size"]),
    ("head_dim zero", lambda p: edit_config(p, head_dim=0), ["head_dim"]),
    ("layer count disagrees", lambda p: edit_config(p, num_hidden_layers=7), ["num_hidden_layers"]),
    ("MTP layer count a string", lambda p: edit_config(p, num_nextn_predict_layers="one"), ["num_nextn_predict"]),
    ("routed scaling NaN", lambda p: edit_config(p, routed_scaling_factor=float("nan")), ["routed_scaling_factor"]),
    ("time_step_limit a string", lambda p: edit_config(p, time_step_limit="big"), ["time_step_limit"]),
    ("truncated", lambda p: os.truncate(p / ST, os.path.getsize(p / ST) // 2), [ST, "truncated"]),
    ("empty file", lambda p: (p / ST).write_bytes(b""), [ST]),
    ("header longer than the file", lambda p: (p / ST).write_bytes((10**9).to_bytes(8, "little") + b"{}"), [ST]),
    ("header not JSON", lambda p: edit_header(p, lambda h: b"{not json"), [ST]),
    ("header a list", lambda p: edit_header(p, lambda h: b"[1, 2]"), [ST]),
    ("header too deep", lambda p: edit_header(p, lambda h: b"[" * 100000), [ST]),
    ("entry without dtype", lambda p: edit_header(p, lambda h: {**h, first(h): {"shape": [1]}}), [ST, "dtype"]),
    ("entry not an object", lambda p: edit_header(p, lambda h: {**h, first(h): 5}), [ST, "backbone."]),
    ("negative shape", lambda p: edit_header(p, set_entry("shape", [-1, 4])), [ST, "shape"]),
    ("shape a string", lambda p: edit_header(p, set_entry("shape", "big")), [ST, "shape"]),
    ("offsets of length 1", lambda p: edit_header(p, set_entry("data_offsets", [0])), [ST, "data_offsets"]),
    ("offsets past the end", lambda p: edit_header(p, set_entry("data_offsets", [0, 10**12])), [ST, "data_offsets"]),
    ("offsets reversed", lambda p: edit_header(p, set_entry("data_offsets", [8, 0])), [ST, "data_offsets"]),
    ("offsets disagree with shape", lambda p: edit_header(p, set_entry("data_offsets", [0, 3])), [ST, "needs"]),
    ("dtype unknown", lambda p: edit_header(p, set_entry("dtype", "F7")), [ST, "F7"]),
    ("metadata not an object", lambda p: edit_header(p, lambda h: {**h, "__metadata__": 5}), [ST, "__metadata__"]),
    ("index not JSON", lambda p: (p / "model.safetensors.index.json").write_text("{oops"), ["index.json"]),
    ("index without weight_map", lambda p: (p / "model.safetensors.index.json").write_text("{}"),
     ["index.json", "weight_map"]),
    ("index weight_map a list", lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
     ["weight_map"]),
    ("index names a missing shard", lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-2.safetensors"}})), ["model-2.safetensors"]),
    ("index shard outside the directory", lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../x.safetensors"}})), ["../x.safetensors"]),
    ("tensor mis-shaped", lambda p: edit_config(p, hidden_size=32), ["mis-shaped"]),
]


@pytest.mark.parametrize("case, corrupt, words", CASES, ids=[c for c, _, _ in CASES])
def test_bad_checkpoint_is_a_nemojax_error_naming_the_input(copy, case, corrupt, words):
    corrupt(copy)
    with pytest.raises(NemojaxError) as caught:
        nemojax.load_pretrained(copy)
    for word in words:
        assert word in str(caught.value), str(caught.value)


@pytest.mark.parametrize("path, dtype, word", [("/nonexistent/model", None, "/nonexistent/model"),
                                               ("config.json", None, "config.json"),
                                               (".", "int8", "int8"), (".", "float99", "float99")])
def test_bad_path_or_dtype_is_a_nemojax_error(copy, path, dtype, word):
    with pytest.raises(NemojaxError, match=word):
        nemojax.load_pretrained(copy / path if not path.startswith("/") else path, dtype=dtype)


def test_published_extra_fields_load_with_a_warning_naming_them(copy):
    edit_config(copy, my_extra_field=1, rope_theta=10000, use_cache=True)  # one unknown, two known-unused
    with pytest.warns(NemojaxWarning) as caught:
        model, _ = nemojax.load_pretrained(copy)
    messages = [str(w.message) for w in caught if issubclass(w.category, NemojaxWarning)]
    assert len(messages) == 1 and "'my_extra_field'" in messages[0] and "config.json" in messages[0]
    assert "rope_theta" not in messages[0] and model.config.hidden_size == TINY["hidden_size"]


def test_workdir_with_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    config = from_hf_config(TINY)
    init = jax.jit(init_variables, static_argnums=0)
    steps = {step: init(config, jax.random.key(step)) for step in (1, 2)}
    write_config(str(tmp_path), config)
    for step, variables in steps.items():
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(str(tmp_path / "checkpoints" / str(step) / "variables"),
                              {"params": variables["params"], "buffers": variables["buffers"]})
    newest = tmp_path / "checkpoints" / "2" / "variables"
    for name in os.listdir(newest):
        if (newest / name).is_file():
            (newest / name).write_bytes(b"\x00garbage")
    with pytest.warns(NemojaxWarning, match="checkpoints/2/variables") as caught:
        _, variables = load_model(tmp_path)
    assert "using" in str(caught[0].message) and "checkpoints/1/variables" in str(caught[0].message)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(steps[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    shutil.rmtree(tmp_path / "checkpoints" / "1" / "variables")
    shutil.copytree(newest, tmp_path / "checkpoints" / "1" / "variables")
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="checkpoints/1/variables"):
        warnings.simplefilter("ignore")
        load_model(tmp_path)
