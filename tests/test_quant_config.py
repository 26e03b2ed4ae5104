"""ModelOpt quantization configs: parsing, exclusions, errors naming every problem, round trip."""

import json

import pytest

from nemojax.errors import CheckpointError
from nemojax.quant import modelopt, recipes

MODULES = [
    "backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
    "backbone.layers.1.mixer.experts.0.up_proj", "backbone.layers.1.mixer.experts.0.down_proj",
    "backbone.layers.1.mixer.experts.1.up_proj", "backbone.layers.1.mixer.experts.1.down_proj",
    "backbone.layers.1.mixer.shared_experts.up_proj", "backbone.layers.1.mixer.shared_experts.down_proj",
    "backbone.layers.1.mixer.fc1_latent_proj", "backbone.layers.10.mixer.q_proj",
    "mtp.layers.1.mixer.experts.0.up_proj", "lm_head",
]


def _write(tmp_path, quant_config=None, hf_quant=None):
    cfg = {"model_type": "nemotron_h"}
    if quant_config is not None:
        cfg["quantization_config"] = quant_config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if hf_quant is not None:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                                  "quantization": hf_quant}))
    return str(tmp_path)


def test_mixed_precision_from_hf_quant_config(tmp_path):
    block = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8", "quantized_layers": {
        "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
        "backbone.layers.1.mixer.shared_experts.up_proj": {"quant_algo": "FP8"}},
        "exclude_modules": ["lm_head", "mtp*"]}
    found, where = modelopt.read_quant_config(_write(tmp_path, hf_quant=block))
    assert where.endswith("hf_quant_config.json")
    scheme = modelopt.parse_scheme(found, MODULES, where)
    assert dict(scheme.formats) == {"backbone.layers.1.mixer.experts.0.up_proj": "nvfp4",
                                    "backbone.layers.1.mixer.shared_experts.up_proj": "fp8"}
    assert scheme.kv_cache == "fp8"


def test_whole_model_algo_with_wildcard_exclusions(tmp_path):
    qc = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
          "ignore": ["lm_head", "backbone.layers.1*", "*q_proj"]}
    found, where = modelopt.read_quant_config(_write(tmp_path, quant_config=qc))
    scheme = modelopt.parse_scheme(found, MODULES, where)
    # layers.1* covers layers.1 only (not layers.10); *q_proj removes the attention projection.
    assert sorted(scheme.formats) == ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
                                      "mtp.layers.1.mixer.experts.0.up_proj"]
    assert set(scheme.formats.values()) == {"nvfp4"} and scheme.kv_cache is None


def test_every_problem_is_named_in_one_error(tmp_path):
    block = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "INT8", "quantized_layers": {
        "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 32},
        "backbone.layers.1.mixer.experts.0.down_proj": {"quant_algo": "INT4_AWQ"},
        "backbone.layers.7.mixer.q_proj": {"quant_algo": "FP8"},
        "lm_head": {"quant_algo": "FP8"}}, "exclude_modules": ["lm_head"]}
    found, where = modelopt.read_quant_config(_write(tmp_path, hf_quant=block))
    with pytest.raises(CheckpointError) as err:
        modelopt.parse_scheme(found, MODULES, where)
    text = str(err.value)
    for needle in ("group_size 32", "INT4_AWQ", "layers.7.mixer.q_proj", "also matched by exclude_modules",
                   "kv_cache_quant_algo 'INT8'", "hf_quant_config.json"):
        assert needle in text


def test_unknown_algorithms_and_disagreeing_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="unknown quant_algo 'W4A8_AWQ'"):
        modelopt.parse_scheme({"quant_algo": "W4A8_AWQ"}, MODULES, "x")
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        modelopt.read_quant_config(_write(tmp_path, quant_config={"quant_method": "gptq"}))
    with pytest.raises(CheckpointError, match="disagree on quant_algo"):
        modelopt.read_quant_config(_write(tmp_path, quant_config={"quant_method": "modelopt", "quant_algo": "FP8"},
                                          hf_quant={"quant_algo": "NVFP4"}))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert modelopt.read_quant_config(_write(plain)) == (None, "")


def test_written_config_reads_back_as_the_same_scheme():
    for recipe in recipes.RECIPES:
        scheme = recipes.recipe_scheme(recipe, MODULES)
        block = modelopt.scheme_to_config(scheme, MODULES)
        assert modelopt.parse_scheme(json.loads(json.dumps(block)), MODULES, "written") == scheme


def test_recipes():
    experts = recipes.recipe_scheme("nvfp4-experts", MODULES)
    assert sorted(experts.formats) == sorted(m for m in MODULES if ".mixer.experts." in m and m.startswith("backbone"))
    release = recipes.recipe_scheme("release", MODULES)
    assert release.formats["backbone.layers.0.mixer.in_proj"] == "fp8"
    assert release.formats["backbone.layers.1.mixer.shared_experts.down_proj"] == "fp8"
    assert "backbone.layers.1.mixer.fc1_latent_proj" not in release.formats  # latent projections stay BF16
    assert "mtp.layers.1.mixer.experts.0.up_proj" not in release.formats  # so does the MTP block
    assert release.kv_cache == "fp8"


def test_scanned_layers_need_one_format_per_kind():
    from nemojax.config import ModelConfig
    from nemojax.config.model_config import nonuniform_formats
    from nemojax.errors import ConfigError

    kinds = ("mamba", "moe", "mamba")
    half = (("backbone/layers_0/mixer/in_proj", "fp8"),)
    assert nonuniform_formats(kinds, half) == ["mixer/in_proj of the mamba layers: 1 of 2 quantized, formats ['fp8']"]
    assert nonuniform_formats(kinds, half + (("backbone/layers_2/mixer/in_proj", "fp8"),)) == []
    ModelConfig(vocab_size=32, hidden_size=32, layer_types=kinds, weight_formats=half, scan_layers=False)
    with pytest.raises(ConfigError, match="scan_layers=false"):
        ModelConfig(vocab_size=32, hidden_size=32, layer_types=kinds, weight_formats=half, scan_layers=True)
