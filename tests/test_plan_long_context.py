"""The plan tool's report of one 1M-token request (Nano, Super, Ultra) against a hand formula from the
published config.json files: KV bytes per attention layer, Mamba state bytes, with bf16 and fp8 KV."""

import json
import os

import pytest

from nemojax.config import from_hf_config, resolve_model_config
from nemojax.planning.caches import cache_bytes_per_device, request_cache_bytes
from nemojax.planning.report import PlanRequest, format_plan, make_plan
from nemojax.planning.weights import serving_config

DATA = os.path.join(os.path.dirname(__file__), "data")
TOKENS = 2**20
PUBLISHED = ("nano-30b-a3b", "super-120b-a12b", "ultra-550b-a55b")


def _published(name: str) -> dict:
    with open(os.path.join(DATA, f"{name}.config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # "_note": ours


def _hand_formula(raw: dict, tokens: int) -> dict:
    """Bytes from the published fields alone: K and V of kv_heads x head_dim per token per attention layer
    (2 bytes bf16, 1 byte fp8) plus a 1-byte validity flag per token; a Mamba layer holds its conv window
    (conv_kernel - 1 positions of the conv channels, bf16) and its SSM state (heads x head_dim x state, fp32)."""
    if raw.get("hybrid_override_pattern"):
        kinds = raw["hybrid_override_pattern"]
        attention, mamba = kinds.count("*"), kinds.count("M")
    else:
        attention, mamba = raw["layers_block_type"].count("attention"), raw["layers_block_type"].count("mamba")
    if raw.get("num_nextn_predict_layers"):
        mtp = raw.get("mtp_hybrid_override_pattern") or "".join(
            {"attention": "*", "mamba": "M"}.get(k, "E") for k in raw["mtp_layers_block_type"])
        attention, mamba = attention + mtp.count("*"), mamba + mtp.count("M")
    inner = raw["mamba_num_heads"] * raw["mamba_head_dim"]
    conv_channels = inner + 2 * raw["n_groups"] * raw["ssm_state_size"]
    mamba_layer = (raw["conv_kernel"] - 1) * conv_channels * 2 + \
        raw["mamba_num_heads"] * raw["mamba_head_dim"] * raw["ssm_state_size"] * 4
    per_layer = {n: tokens * (2 * raw["num_key_value_heads"] * raw["head_dim"] * size + 1)
                 for n, size in (("bf16", 2), ("fp8", 1))}
    return {"attention_layers": attention, "mamba_layers": mamba, "mamba_state_bytes_per_layer": mamba_layer,
            **{f"kv_bytes_per_attention_layer_{n}": b for n, b in per_layer.items()},
            **{f"total_bytes_{n}": attention * b + mamba * mamba_layer for n, b in per_layer.items()}}


@pytest.mark.parametrize("name", PUBLISHED)
def test_one_million_token_request_matches_hand_formula(name):
    raw = _published(name)
    report = request_cache_bytes(serving_config(from_hf_config(raw)), TOKENS)
    want = _hand_formula(raw, TOKENS)
    assert {k: report[k] for k in want} == want
    assert report["kv_bytes_fp8"] * 2 - TOKENS * want["attention_layers"] == report["kv_bytes_bf16"]


def test_plan_reports_the_request_and_the_kv_dtype():
    config = resolve_model_config("tiny")
    single = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    plan = make_plan(config, PlanRequest(single, compile_activations=False, kv_cache_dtype="fp8", seq_len=512,
                                         request_tokens=4096))
    fp8 = serving_config(config).replace(kv_cache_dtype="float8_e4m3fn")
    assert plan["bytes_per_device"]["kv_cache"] == cache_bytes_per_device(fp8, 1, 512, single)["kv_cache"]
    assert plan["one_request"] == request_cache_bytes(fp8, 4096)
    text = format_plan(plan)
    assert "one request of 4,096 tokens" in text and "fp8 KV" in text
