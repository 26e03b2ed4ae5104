"""`python -m nemojax.convert`: HF -> Orbax -> HF gives back the same tensor names, bytes and config.json
(BF16, sharded; ModelOpt NVFP4/FP8; scanned layers; a transformers-made checkpoint); the Orbax copy
computes the HF directory's logits; bad input exits 2 naming the file and tensor and leaves no DST;
kill -9 during a conversion leaves no DST that loads."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic_checkpoint import write_synthetic_checkpoint

import nemojax
from nemojax.checkpoint.orbax import load_model, save_model
from nemojax.checkpoint.safetensors_io import SafetensorsDir, save_file
from nemojax.config.files import resolve_model_config
from nemojax.convert import main
from nemojax.errors import CheckpointError
from nemojax.generate.loading import load_checkpoint
from nemojax.quant.master_weights import dequantize_variables
from nemojax.quantize import quantize_checkpoint
from nemojax.sharding import make_mesh

pytestmark = pytest.mark.xdist_group("convert")  # module fixtures share the checkpoints
SMALL = dict(vocab_size=128, hidden_size=64, head_dim=16, mamba_head_dim=8, mamba_num_heads=8, ssm_state_size=16,
             chunk_size=8, intermediate_size=64, n_routed_experts=8, moe_intermediate_size=32,
             moe_shared_expert_intermediate_size=32, moe_latent_size=32, scan_layers=False)
SHARD = "40KB"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def convert(*args: str) -> int:
    return main([*args, "--quiet"])


def same_tensors(a_dir, b_dir) -> None:
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert (a.dtype(key), a.shape(key)) == (b.dtype(key), b.shape(key)), key
        assert np.asarray(a.read(key)).tobytes() == np.asarray(b.read(key)).tobytes(), key


def assert_same_variables(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_json(path):
    return json.loads(open(path).read())


def no_output(dst) -> bool:
    """Neither DST nor a partial directory of it exists."""
    parent, name = os.path.split(os.path.abspath(dst))
    return not any(entry == name or entry.startswith(name + ".") for entry in os.listdir(parent))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_dir(root):
    """A small BF16 checkpoint (every layer kind, MTP) in shards of 40 KB, with a chat template."""
    directory = root / "hf"
    write_synthetic_checkpoint(str(directory), resolve_model_config("tiny", **SMALL), 40_000)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return directory


@pytest.fixture(scope="module")
def orbax_dir(root, hf_dir):
    assert convert("hf-to-orbax", str(hf_dir), str(root / "orbax")) == 0
    return root / "orbax"


def test_bf16_round_trip_is_byte_identical(root, hf_dir, orbax_dir):
    assert sorted(os.listdir(orbax_dir)) == ["config.json", "conversion.json", "generation_config.json",
                                             "hf_config.json", "tokenizer_config.json", "variables"]
    record = read_json(orbax_dir / "conversion.json")
    assert record["source"] == str(hf_dir) and record["quantization"] is None and record["nemojax_version"]
    assert any(name.startswith("mtp.") for name in SafetensorsDir(hf_dir).keys())
    assert convert("orbax-to-hf", str(orbax_dir), str(root / "back"), "--max-shard-size", SHARD) == 0
    same_tensors(hf_dir, root / "back")
    assert read_json(root / "back" / "config.json") == read_json(hf_dir / "config.json")
    index = read_json(root / "back" / "model.safetensors.index.json")
    assert index["weight_map"] == read_json(hf_dir / "model.safetensors.index.json")["weight_map"]
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (root / "back" / name).read_text() == (hf_dir / name).read_text()


def test_orbax_copy_computes_the_hf_logits(hf_dir, orbax_dir):
    ids = jnp.asarray([[1, 5, 9, 33, 2, 17, 64, 100]], jnp.int32)
    hf_model, hf_vars = nemojax.load_pretrained(hf_dir, dtype="float32")
    model, variables = nemojax.load_pretrained(orbax_dir, dtype="float32")  # a nemojax dir: read by load_model
    assert model.config == hf_model.config
    apply = jax.jit(model.apply)  # one compile: the same structure, placed on the same device
    hf_vars, variables = jax.device_put((hf_vars, variables), jax.devices()[0])
    expected = apply(hf_vars, ids)
    assert float(jnp.abs(expected).max()) > 0
    np.testing.assert_array_equal(np.asarray(apply(variables, ids)), np.asarray(expected))
    # serve.py's loader, sharded over a mesh: the same values.
    _, sharded = load_checkpoint(str(orbax_dir), dtype="float32", mesh=make_mesh(fsdp=2, tensor=2, expert=2))
    assert_same_variables(sharded, variables)


@pytest.fixture(scope="module")
def nvfp4_dir(root):
    """A ModelOpt checkpoint of the `release` recipe: NVFP4 experts, FP8 linears."""
    config = resolve_model_config("tiny", **dict(SMALL, layer_types=("mamba", "moe", "attention"),
                                                  mtp_layer_types=(), num_nextn_predict_layers=0))
    write_synthetic_checkpoint(str(root / "float"), config, 10**9)
    quantize_checkpoint(str(root / "float"), str(root / "nvfp4"), "release", calib_tokens=16, calib_seq_len=16)
    return root / "nvfp4"


def test_quantized_round_trip_keeps_packed_tensors(root, nvfp4_dir):
    assert convert("hf-to-orbax", str(root / "nvfp4"), str(root / "nvfp4_orbax")) == 0
    record = read_json(root / "nvfp4_orbax" / "conversion.json")
    assert set(record["quantization"]["weight_formats"]) == {"nvfp4", "fp8"}
    _, variables = load_model(root / "nvfp4_orbax")
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(variables)}
    assert {"uint8", "float8_e4m3fn"} <= dtypes  # NVFP4 weights packed, FP8 weights and block scales kept
    assert convert("orbax-to-hf", str(root / "nvfp4_orbax"), str(root / "nvfp4_back")) == 0
    same_tensors(root / "nvfp4", root / "nvfp4_back")
    for name in ("config.json", "hf_quant_config.json"):
        assert read_json(root / "nvfp4_back" / name) == read_json(root / "nvfp4" / name)
    # The same config and the same variables as loading the HF directory: the same logits (the BF16 test
    # runs the model; here one compile less).
    hf_model, hf_vars = nemojax.load_pretrained(root / "nvfp4")
    model, variables = nemojax.load_pretrained(root / "nvfp4_orbax")
    assert model.config == hf_model.config
    assert_same_variables(variables, hf_vars)


def test_dtype_dequantizes_quantized_checkpoint(root, nvfp4_dir):
    """--dtype float32: a float model (no packed tensors, no scales) computing the quantized model's logits."""
    dst = root / "nvfp4_float32"
    assert convert("hf-to-orbax", str(nvfp4_dir), str(dst), "--dtype", "float32") == 0
    assert "hf_quant_config.json" not in os.listdir(dst)
    assert "quantization_config" not in read_json(dst / "hf_config.json")
    record = read_json(dst / "conversion.json")
    assert record["quantization"] is None and set(record["dequantized"]["weight_formats"]) == {"nvfp4", "fp8"}
    model, variables = nemojax.load_pretrained(dst, dtype="float32")
    assert model.config.weight_formats == () and model.config.kv_cache_quant == "none"
    assert all(jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype.itemsize >= 2  # no uint8 / float8
               for leaf in jax.tree.leaves(variables))
    q_model, q_vars = nemojax.load_pretrained(nvfp4_dir, dtype="float32")
    assert q_model.config.weight_formats
    # Leaf by leaf: what the training loader's dequantisation (whole tensors, nemojax layout) gives.
    _, master = dequantize_variables(q_model.config, q_vars, "float32")
    assert jax.tree.structure(master) == jax.tree.structure(variables)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(master), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.float32))
    ids = jnp.asarray([[1, 5, 9, 33, 2, 17, 64, 100]], jnp.int32)
    expected = np.asarray(jax.jit(q_model.apply)(q_vars, ids))
    got = np.asarray(jax.jit(model.apply)(variables, ids))
    assert np.abs(expected).max() > 0
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # Back to the published layout: a float checkpoint (float32 weights, no scales, no quantization config).
    assert convert("orbax-to-hf", str(dst), str(root / "nvfp4_float32_hf")) == 0
    back = SafetensorsDir(root / "nvfp4_float32_hf")
    assert not any(key.endswith(("_scale", "_scale_2")) for key in back.keys())
    assert {back.dtype(key).name for key in back.keys()} == {"float32", "bfloat16"}  # routers: as stored
    assert all(back.dtype(key).name == "float32" for key in back.keys() if "experts." in key or "proj" in key)
    assert "hf_quant_config.json" not in os.listdir(root / "nvfp4_float32_hf")
    assert "quantization_config" not in read_json(root / "nvfp4_float32_hf" / "config.json")
    # orbax-to-hf --dtype float32 of the packed Orbax copy dequantises the same way: the same files.
    assert convert("hf-to-orbax", str(nvfp4_dir), str(root / "nvfp4_packed")) == 0
    assert convert("orbax-to-hf", str(root / "nvfp4_packed"), str(root / "nvfp4_packed_hf"), "--dtype", "float32") == 0
    same_tensors(root / "nvfp4_float32_hf", root / "nvfp4_packed_hf")
    assert sorted(os.listdir(root / "nvfp4_packed_hf")) == sorted(os.listdir(root / "nvfp4_float32_hf"))
    assert read_json(root / "nvfp4_packed_hf" / "config.json") == read_json(root / "nvfp4_float32_hf" / "config.json")


def test_scanned_layers_round_trip(root):
    """16 layers: the Orbax tree is stacked per layer kind (chunked per layer); back to the same bytes."""
    config = resolve_model_config("tiny", **dict(SMALL, layer_types=("mamba", "moe", "attention", "mlp") * 4,
                                                  scan_layers=True))
    write_synthetic_checkpoint(str(root / "deep"), config, 10**9)
    assert convert("hf-to-orbax", str(root / "deep"), str(root / "deep_orbax")) == 0
    model, variables = load_model(root / "deep_orbax")
    assert model.config.scan_layers
    _, expected = nemojax.load_pretrained(root / "deep")
    assert_same_variables(variables, expected)
    assert convert("orbax-to-hf", str(root / "deep_orbax"), str(root / "deep_back")) == 0
    same_tensors(root / "deep", root / "deep_back")
    assert sorted(f for f in os.listdir(root / "deep_back")) == ["config.json", "model.safetensors"]


def test_orbax_written_model_dir_exports(root, hf_dir):
    """A model directory Orbax itself wrote (save_model: OCDBT) exports to the same tensors."""
    model, variables = nemojax.load_pretrained(hf_dir)
    save_model(root / "saved", model.config, variables)
    assert convert("orbax-to-hf", str(root / "saved"), str(root / "saved_hf"), "--max-shard-size", "1GB") == 0
    a, b = SafetensorsDir(hf_dir), SafetensorsDir(root / "saved_hf")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():  # the router weights come out in the float32 the model holds them in
        assert b.dtype(key) == (np.float32 if key.endswith("gate.weight") else a.dtype(key)), key
        np.testing.assert_array_equal(np.asarray(b.read(key)).astype(a.dtype(key)), np.asarray(a.read(key)))
    assert read_json(root / "saved_hf" / "config.json")["hybrid_override_pattern"] == "ME*M-E"


def _corrupt_copy(hf_dir, target, how: str) -> str:
    """A copy of hf_dir broken one way; returns the file or tensor name the error must mention."""
    shutil.copytree(hf_dir, target)
    index = read_json(target / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    if how == "truncated":
        path = target / shards[1]
        path.write_bytes(path.read_bytes()[:-100])
        return shards[1]
    if how == "corrupt_header":
        path = target / shards[2]
        data = bytearray(path.read_bytes())
        data[8:40] = b"\xff" * 32
        path.write_bytes(bytes(data))
        return shards[2]
    if how == "missing_shard":
        os.remove(target / shards[-1])
        return shards[-1]
    if how == "unknown_tensor":
        st = SafetensorsDir(target)
        tensors = {k: np.array(st.read(k)) for k in st.keys() if index["weight_map"][k] == shards[0]}  # copies
        tensors["backbone.layers.0.mixer.surprise.weight"] = np.zeros((2, 2), np.float32)
        save_file(tensors, target / shards[0])
        return "backbone.layers.0.mixer.surprise.weight"
    if how == "shape_vs_config":
        config = read_json(target / "config.json")
        config["intermediate_size"] = 48
        (target / "config.json").write_text(json.dumps(config))
        return "backbone.layers.4.mixer.up_proj.weight"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "corrupt_header", "missing_shard", "unknown_tensor", "shape_vs_config"])
def test_bad_input_exits_2_naming_file_and_tensor(root, hf_dir, how, capsys):
    source, dst = root / f"bad_{how}", root / f"bad_{how}_out"
    named = _corrupt_copy(hf_dir, source, how)
    assert convert("hf-to-orbax", str(source), str(dst)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    if how in ("unknown_tensor", "shape_vs_config"):
        assert ".safetensors" in err  # the file holding the tensor
    assert no_output(dst)


def test_existing_destination_needs_overwrite(root, orbax_dir, capsys):
    dst = root / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert("orbax-to-hf", str(orbax_dir), str(dst)) == 2
    assert "--overwrite" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "mine"
    assert convert("orbax-to-hf", str(orbax_dir), str(dst), "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert convert("hf-to-orbax", str(orbax_dir), str(root / "wrong_way")) == 2  # not a HF directory
    assert "config.json" in capsys.readouterr().err


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["orbax-to-hf", "a", "b", "--max-shard-size", "5 potatoes"])
    assert e.value.code == 2 and "--max-shard-size" in capsys.readouterr().err


def test_kill_9_leaves_no_loadable_destination(root):
    """SIGKILL while the Orbax tree is being written: DST does not exist and does not load."""
    config = resolve_model_config("tiny", **dict(SMALL, vocab_size=131072, hidden_size=128))  # ~70 MB
    write_synthetic_checkpoint(str(root / "big"), config, 10**9)
    dst = root / "big_orbax"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "nemojax.convert", "hf-to-orbax", str(root / "big"), str(dst),
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = root / f"big_orbax.partial-{proc.pid}" / "variables"
    deadline = time.monotonic() + 120
    while not (partial.is_dir() and os.listdir(partial)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not dst.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(str(dst))


@pytest.mark.torch
def test_transformers_checkpoint_round_trip(root):
    """A checkpoint transformers wrote (its names, its config.json, its shards) comes back unchanged."""
    import torch
    from hf_reference import make_checkpoint

    model = make_checkpoint(root / "tf_float32", "ME*-", seed=3)
    model.to(torch.bfloat16).save_pretrained(root / "tf", max_shard_size="100KB")
    assert (root / "tf" / "model.safetensors.index.json").is_file()
    assert convert("hf-to-orbax", str(root / "tf"), str(root / "tf_orbax")) == 0
    assert convert("orbax-to-hf", str(root / "tf_orbax"), str(root / "tf_back"), "--max-shard-size", "100KB") == 0
    same_tensors(root / "tf", root / "tf_back")
    assert read_json(root / "tf_back" / "config.json") == read_json(root / "tf" / "config.json")
