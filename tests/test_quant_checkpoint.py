"""ModelOpt checkpoints end to end: a MIXED_PRECISION checkpoint (routed experts NVFP4, shared experts and
Mamba in/out projections FP8, the rest BF16, FP8 KV scales) made by our PTQ from a random transformers
model loads packed, computes the logits of the transformers reference run on the dequantised weights,
and serve.py's greedy output equals that reference's generate()."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_reference import make_checkpoint, reference_logits
from transformers import NemotronHForCausalLM

import nemojax
import serve
from nemojax.checkpoint.hf import quant_scheme, quantizable_modules, to_published
from nemojax.checkpoint.safetensors_io import SafetensorsDir, save_file
from nemojax.errors import CheckpointError
from nemojax.planning.weights import weight_bytes_per_device
from nemojax.quant import modelopt, ptq
from nemojax.quantize import quantize_checkpoint
from nemojax.sharding import make_mesh

# Every test uses the transformers reference built by the `mixed` fixture (torch).
pytestmark = [pytest.mark.xdist_group("quant_checkpoint"), pytest.mark.torch]
PATTERN = "ME*-"


def _write_float(directory, tensors, config: dict, dtype: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mixed")


@pytest.fixture(scope="module")
def mixed(root):
    """(quantized checkpoint dir, transformers reference on its dequantised weights, report); the BF16
    checkpoint it was quantized from is root / "bf16"."""
    # transformers' cached Mamba decoding does not clamp dt at time_step_min: keep it negligible.
    make_checkpoint(root / "float32", PATTERN, seed=11, moe_latent_size=32, time_step_min=1e-6)
    st = SafetensorsDir(root / "float32")
    hf_config = json.loads((root / "float32" / "config.json").read_text())
    bf16 = {k: np.asarray(st.read(k)) if k.endswith("e_score_correction_bias")
            else np.asarray(st.read(k)).astype(ml_dtypes.bfloat16) for k in st.keys()}
    _write_float(root / "bf16", bf16, hf_config, "bfloat16")
    report = quantize_checkpoint(str(root / "bf16"), str(root / "mixed"), "release", calib_tokens=256,
                                 calib_seq_len=32)
    quantized = SafetensorsDir(root / "mixed")
    tensors = {k: np.asarray(quantized.read(k)) for k in quantized.keys()}
    block, source = modelopt.read_quant_config(str(root / "mixed"))
    scheme = modelopt.parse_scheme(block, quantizable_modules(nemojax.from_hf_config(hf_config)), source)
    _write_float(root / "dequantized", ptq.dequantize_tensors(tensors, scheme), hf_config, "float32")
    reference = NemotronHForCausalLM.from_pretrained(root / "dequantized").float().eval()
    return root / "mixed", reference, report


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_mixed_checkpoint_stays_quantized_in_memory(mixed):
    directory, _, report = mixed
    model, variables = nemojax.load_pretrained(directory, dtype=jnp.float32)
    c = model.config
    assert c.kv_cache_quant == "fp8" and c.param_dtype == "bfloat16"
    assert dict(c.weight_formats) == {
        "backbone/layers_0/mixer/in_proj": "fp8", "backbone/layers_0/mixer/out_proj": "fp8",
        "backbone/layers_1/mixer/experts/up_proj": "nvfp4", "backbone/layers_1/mixer/experts/down_proj": "nvfp4",
        "backbone/layers_1/mixer/shared_experts/up_proj": "fp8",
        "backbone/layers_1/mixer/shared_experts/down_proj": "fp8"}
    layers = variables["params"]["backbone"]
    experts = layers["layers_1"]["mixer"]["experts"]
    e, w, f = c.n_routed_experts, c.moe_expert_width, c.moe_intermediate_size
    assert experts["up_proj_weight"].dtype == jnp.uint8 and experts["up_proj_weight"].shape == (e, f, w // 2)
    assert experts["up_proj_weight_scale"].dtype == jnp.float8_e4m3fn
    assert experts["down_proj_weight_scale_2"].shape == (e,)
    assert layers["layers_0"]["mixer"]["in_proj"]["kernel"].dtype == jnp.float8_e4m3fn
    assert layers["layers_2"]["mixer"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert layers["layers_2"]["mixer"]["k_scale"].shape == ()
    assert report["storage"]["nvfp4"]["bits_per_param"] < 4.6 and report["storage"]["fp8"]["bits_per_param"] < 8.1


def test_mixed_checkpoint_logits_equal_the_reference_on_dequantized_weights(mixed):
    directory, reference, _ = mixed
    model, variables = nemojax.load_pretrained(directory, dtype=jnp.float32, param_dtype=np.float32)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 19))
    ours = jax.jit(model.apply)(variables, ids)
    assert rel_err(ours, reference_logits(reference, ids)) < 1e-4


def test_serve_greedy_equals_reference_generate(mixed, tmp_path):
    directory, reference, _ = mixed
    prompts = [[5, 17, 33, 8, 61, 20], [44, 9, 70, 3, 12, 88]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    status = serve.main(["--checkpoint", str(directory), "--prompts", str(tmp_path / "in.jsonl"), "--output",
                         str(tmp_path / "out.jsonl"), "--max-new-tokens", "8", "--dtype", "float32",
                         "--ignore-eos", "--no-progress"])
    assert status == 0
    ours = [json.loads(line)["output_ids"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    import torch

    with torch.no_grad():
        out = reference.generate(torch.as_tensor(prompts), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
    assert ours == out[:, len(prompts[0]):].tolist()


def test_save_pretrained_writes_the_same_modelopt_checkpoint(mixed, tmp_path):
    directory, _, _ = mixed
    model, variables = nemojax.load_pretrained(directory)
    nemojax.checkpoint.hf.save_pretrained(tmp_path, model.config, variables)
    original, again = SafetensorsDir(directory), SafetensorsDir(tmp_path)
    assert sorted(original.keys()) == sorted(again.keys())
    for name in original.keys():
        a, b = np.asarray(original.read(name)), np.asarray(again.read(name))
        assert a.shape == b.shape, name
        if name.endswith(ptq.SCALE_SUFFIXES + ptq.KV_SCALE_SUFFIXES) or a.dtype.itemsize == 1:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name  # quantized: the same bytes
        else:  # float tensors: the same values (the router is written in float32)
            np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32), err_msg=name)
    block, source = modelopt.read_quant_config(str(tmp_path))
    assert modelopt.parse_scheme(block, quantizable_modules(model.config), source) == quant_scheme(model.config)
    assert set(to_published(model.config, variables)) == set(original.keys())


def _rewrite(src, dst, tensors=None, block=None):
    """A copy of checkpoint `src` with some tensors and/or the quantization block replaced."""
    st = SafetensorsDir(src)
    data = {k: np.asarray(st.read(k)) for k in st.keys()}
    data.update(tensors or {})
    config = json.loads((src / "config.json").read_text())
    dst.mkdir()
    if block is not None:
        config["quantization_config"] = {"quant_method": "modelopt", **block}
    (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in data.items() if v is not None}, dst / "model.safetensors")


def test_kv_scales_under_the_projections_load(mixed, tmp_path):
    directory, _, _ = mixed
    st = SafetensorsDir(directory)
    moved = {"backbone.layers.2.mixer.k_scale": None, "backbone.layers.2.mixer.v_scale": None,
             "backbone.layers.2.mixer.k_proj.k_scale": np.float32(0.5), "backbone.layers.2.mixer.v_proj.v_scale":
             np.asarray(st.read("backbone.layers.2.mixer.v_scale"))}
    _rewrite(directory, tmp_path / "moved", moved)
    _, variables = nemojax.load_pretrained(tmp_path / "moved")
    assert float(variables["params"]["backbone"]["layers_2"]["mixer"]["k_scale"]) == 0.5


def test_bad_quantization_is_one_error_naming_everything(mixed, tmp_path):
    directory, _, _ = mixed
    block = json.loads((directory / "config.json").read_text())["quantization_config"]
    layers = block["quantized_layers"]
    layers["backbone.layers.1.mixer.experts.0.up_proj"]["group_size"] = 32
    layers["backbone.layers.3.mixer.up_proj"] = {"quant_algo": "W4A8_AWQ"}
    _rewrite(directory, tmp_path / "bad_config", block=block)
    with pytest.raises(CheckpointError) as err:
        nemojax.load_pretrained(tmp_path / "bad_config")
    assert "group_size 32" in str(err.value) and "W4A8_AWQ" in str(err.value)

    block = json.loads((directory / "config.json").read_text())["quantization_config"]
    block["quantized_layers"]["backbone.layers.1.mixer.experts.3.down_proj"] = {"quant_algo": "FP8"}
    _rewrite(directory, tmp_path / "mixed_experts", block=block)
    with pytest.raises(CheckpointError, match="experts/down_proj: its 8 experts must share one format"):
        nemojax.load_pretrained(tmp_path / "mixed_experts")

    # Tensors that disagree with the config: a float weight where NVFP4 is declared, a missing scale,
    # an NVFP4 tensor on a module the config keeps in BF16.
    block = json.loads((directory / "config.json").read_text())["quantization_config"]
    del block["quantized_layers"]["backbone.layers.1.mixer.shared_experts.up_proj"]
    bad = {"backbone.layers.1.mixer.experts.2.up_proj.weight": np.zeros((32, 32), ml_dtypes.bfloat16),
           "backbone.layers.1.mixer.experts.5.down_proj.weight_scale_2": None}
    _rewrite(directory, tmp_path / "bad_tensors", bad, block)
    with pytest.raises(CheckpointError) as err:
        nemojax.load_pretrained(tmp_path / "bad_tensors")
    text = str(err.value)
    for needle in ("experts.5.down_proj.weight_scale_2", "missing",
                   "experts.2.up_proj.weight: (32, 32), expected (32, 16)", "bfloat16, expected uint8",
                   "shared_experts.up_proj.weight_scale", "unexpected",
                   "shared_experts.up_proj.weight: float8_e4m3fn, expected a float tensor"):
        assert needle in text, needle


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4-experts", "release"])
def test_plan_counts_the_bytes_the_loader_holds(mixed, root, fmt, tmp_path):
    """`python -m nemojax.plan --weights FMT` per device == what load_pretrained holds per device, for a
    checkpoint PTQ wrote in that format, on one device and sharded over data=2, tensor=2, expert=2."""
    source = root / "bf16"
    directory = source if fmt == "bf16" else tmp_path / fmt
    if fmt != "bf16":
        quantize_checkpoint(str(source), str(directory), fmt, calib_tokens=64, calib_seq_len=32)
    config = nemojax.from_hf_config(source)
    for mesh_shape in ({}, {"data": 2, "tensor": 2, "expert": 2}):
        mesh = make_mesh(**mesh_shape) if mesh_shape else None
        _, variables = nemojax.load_pretrained(directory, mesh=mesh)
        held = {c: sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(variables[c]))
                for c in ("params", "buffers")}
        plan = weight_bytes_per_device(config, dict.fromkeys(("data", "fsdp", "tensor", "expert"), 1) | mesh_shape,
                                       fmt)
        assert held == {"params": plan["routed_experts"] + plan["other"], "buffers": plan["buffers"]}


def test_mixed_checkpoint_on_a_mesh_equals_one_device(mixed):
    """Packed experts run expert-parallel (expert=2) with their intermediate dim over tensor=2."""
    directory, _, _ = mixed
    model, variables = nemojax.load_pretrained(directory, dtype="float32")
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (4, 11))
    expected = jax.jit(model.apply)(variables, ids)
    mesh = make_mesh(data=2, tensor=2, expert=2)
    _, sharded = nemojax.load_pretrained(directory, dtype="float32", mesh=mesh)
    experts = sharded["params"]["backbone"]["layers_1"]["mixer"]["experts"]
    assert experts["down_proj_weight"].sharding.spec[0] == "expert"
    with nemojax.use_mesh(mesh):
        got = jax.jit(model.apply)(sharded, ids)
    assert rel_err(got, expected) < 1e-5


def test_quantize_cli_exits_2_on_bad_input(mixed, tmp_path, capsys):
    from nemojax.quantize import main
    directory, _, _ = mixed
    assert main([str(directory), str(tmp_path / "out"), "--recipe", "release"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main([str(directory.parent / "bf16"), str(directory), "--recipe", "fp8"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_scanned_layers_hold_the_quantized_weights_per_kind(mixed):
    directory, _, _ = mixed
    model, variables = nemojax.load_pretrained(directory, dtype="float32")
    scanned, stacked = nemojax.load_pretrained(directory, dtype="float32", scan_layers=True)
    assert not model.config.scan_layers and scanned.config.scan_layers
    experts = stacked["params"]["backbone"]["layers"]["moe"]["mixer"]["experts"]
    assert experts["up_proj_weight"].dtype == jnp.uint8 and experts["up_proj_weight"].shape[0] == 1  # one MoE layer
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, 7))
    assert rel_err(jax.jit(scanned.apply)(stacked, ids), jax.jit(model.apply)(variables, ids)) < 1e-6
