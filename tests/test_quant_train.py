"""Training with quantization: `quant.training = "nvfp4"` selects the recipe per weight, and fine-tuning a
ModelOpt checkpoint (`--init-from`) dequantises it to float master weights, saying so."""

import json
import os

import jax
import numpy as np
import pytest
from test_train import SMALL, TINY

from nemojax.checkpoint.hf import save_pretrained
from nemojax.errors import ConfigError
from nemojax.model import init_variables
from nemojax.model.layers import recipe_applies
from nemojax.quantize import quantize_checkpoint
from nemojax.train.loop import train
from nemojax.train.metrics import read_metrics
from nemojax.train.run_config import load_run_config, model_config


def test_recipe_keeps_the_configured_layers_in_bf16():
    config = model_config(load_run_config(TINY, ["--config.quant.training=nvfp4"]))
    assert config.train_quant == "nvfp4" and config.num_layers == 6
    quantized = ["backbone/layers_0/mixer/in_proj", "backbone/layers_1/mixer/experts/up_proj",
                 "backbone/layers_1/mixer/shared_experts/down_proj", "backbone/layers_4/mixer/up_proj"]
    kept = ["backbone/layers_0/mixer/out_proj", "backbone/layers_2/mixer/q_proj", "lm_head",
            "backbone/layers_1/mixer/fc1_latent_proj", "mtp/layers_1/block/mixer/experts/up_proj",
            "backbone/layers_5/mixer/experts/up_proj"]  # layer 5: the last 15% of 6 layers
    assert all(recipe_applies(config, k) for k in quantized)
    assert not any(recipe_applies(config, k) for k in kept)
    plain = model_config(load_run_config(TINY, []))
    assert not recipe_applies(plain, quantized[0])
    with pytest.raises(ConfigError, match="quant.training"):
        model_config(load_run_config(TINY, ["--config.quant.training=fp4"]))


# Two layers, no MTP block: one compile of the recipe's train step stays short.
SHORT = SMALL + ["--config.model.hybrid_override_pattern=ME", "--config.model.num_nextn_predict_layers=0"]


def test_fine_tune_a_quantized_checkpoint_with_the_nvfp4_recipe(tmp_path, capsys):
    cfg = load_run_config(TINY, SHORT)
    config = model_config(cfg)
    save_pretrained(tmp_path / "bf16", config, init_variables(config, jax.random.key(0)), dtype="bfloat16")
    quantize_checkpoint(str(tmp_path / "bf16"), str(tmp_path / "release"), "release", calib_tokens=64,
                        calib_seq_len=32)
    workdir = str(tmp_path / "run")
    run = load_run_config(TINY, SHORT + ["--config.num_steps=2", "--config.checkpoint_every=2",
                                         "--config.eval_batches=1", "--config.quant.training=nvfp4"])
    train(run, workdir, init_from=str(tmp_path / "release"))
    assert "dequantised to float32 master weights" in capsys.readouterr().out
    saved = json.load(open(os.path.join(workdir, "config.json")))["model"]
    assert saved["weight_formats"] == [] and saved["train_quant"] == "nvfp4"
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in records)
