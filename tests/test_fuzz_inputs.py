"""Fuzzing the input gates with a fixed seed and a few seconds each: random and mutated JSONL prompt lines,
config.json fields and safetensors headers. Every input must end as a served request within the engine's
limits, or as a nemojax error naming it; no other exception may escape."""

import json
import math
import os
import random
import struct
import time
import warnings

import numpy as np
import pytest

from nemojax.checkpoint.safetensors_io import SafetensorsDir, save_file
from nemojax.config import INT32_MAX, ModelConfig, from_hf_config
from nemojax.errors import NemojaxError
from nemojax.generate.jsonl import count_lines, read_lines
from nemojax.generate.loading import load_encoder
from nemojax.generate.requests import LINE_FIELDS, Defaults, Request
from nemojax.generate.serving import parse
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

SEED = 20240518
SECONDS = 2.0  # per target: the loop stops at this budget (or at MAX_CASES)
MAX_CASES = 20000
VOCAB, CONTEXT = 300, 64
VALID_LINES = [
    {"prompt": "hello world"}, {"input_ids": [5, 6, 7], "max_new_tokens": 4, "temperature": 0.5, "seed": 3},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
     "reasoning": "off", "stop": ["\n"], "top_p": 0.9, "top_k": 5, "min_p": 0.1, "thinking_budget": 2},
]
ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, -2**63, 10**30, 1.5, -0.0, 1e308, float("nan"), float("inf"),
              float("-inf"), "", "x", "\u2028", "\ud800", [], [1, "a"], [[1]], {}, {"role": "user"}, "a" * 200]
ODD_TEXT = ['NaN', 'Infinity', '-Infinity', '\\ud800', '\\u2028', '\u2028', '\u0085', '\r', '\x00', '{', '}', '[',
            ']', '"', ',', ':', '\\', '9' * 30, '1e999', 'null', 'true', '"stop": ""', '"temprature": 1']


def budget(rng_seed):
    """A seeded generator and a deadline-bounded range of case numbers."""
    rng = random.Random(rng_seed)
    deadline = time.monotonic() + SECONDS
    return rng, (i for i in range(MAX_CASES) if time.monotonic() < deadline)


def random_value(rng, depth=0):
    if depth < 3 and rng.random() < 0.2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and rng.random() < 0.1:
        return {rng.choice(LINE_FIELDS + ("role", "content", "zz")): random_value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if rng.random() < 0.3:
        return rng.randrange(-2**40, 2**40) >> rng.randrange(41)
    return rng.choice(ODD_VALUES)


def random_line(rng) -> bytes:
    """A mutated valid line, a random object over the known (and some unknown) fields, or raw bytes."""
    kind = rng.random()
    if kind < 0.4:
        record = dict(rng.choice(VALID_LINES))
        for _ in range(rng.randrange(1, 4)):
            record[rng.choice(LINE_FIELDS + ("temprature", "extra"))] = random_value(rng)
        return json.dumps(record, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
    if kind < 0.8:
        text = json.dumps(rng.choice(VALID_LINES))
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(len(text) + 1)
            if rng.random() < 0.5:
                text = text[:at] + rng.choice(ODD_TEXT) + text[at:]
            else:
                text = text[:at] + text[at + rng.randrange(1, 6):]
        return text.encode("utf-8", "surrogatepass")
    return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(["the quick brown fox", "hello world, hello there"] * 10, VOCAB), str(directory))
    return load_encoder(str(directory))[0]


def check_request(request: Request) -> None:
    """What the engine relies on: ids in the vocabulary and within the context, settings within int32 and finite."""
    assert request.prompt_ids and all(0 <= i < VOCAB for i in request.prompt_ids)
    assert len(request.prompt_ids) + request.max_new_tokens <= CONTEXT and request.max_new_tokens >= 1
    assert 0 <= request.top_k <= INT32_MAX and math.isfinite(request.temperature) and request.temperature >= 0
    assert 0 < request.top_p <= 1 and 0 <= request.min_p <= 1
    assert request.thinking_budget is None or 0 <= request.thinking_budget <= INT32_MAX
    assert all(isinstance(s, str) and s for s in request.stop)


def test_fuzzed_prompt_lines_are_served_or_refused_by_line(encoder, tmp_path):
    rng, cases = budget(SEED)
    lines = [random_line(rng).replace(b"\n", b" ") for _ in cases]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    read = list(read_lines(str(path)))
    assert len(read) == len(lines) == count_lines(str(path)) and len(lines) > 100
    outcomes = {"request": 0, "error": 0}
    for line in read:
        result = parse(line, Defaults(max_new_tokens=8), encoder, VOCAB, CONTEXT)
        if isinstance(result, Request):
            check_request(result)
            outcomes["request"] += 1
        else:
            assert set(result) == {"error"} and result["error"].startswith(f"line {line.number}: ")
            outcomes["error"] += 1
    assert outcomes["request"] > 10 and outcomes["error"] > 10, outcomes


VALID_CONFIG = dict(vocab_size=64, hidden_size=16, hybrid_override_pattern="M*E", num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=4,
                    n_groups=1, chunk_size=8, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
                    moe_shared_expert_intermediate_size=8, eos_token_id=2, mtp_hybrid_override_pattern="*E",
                    num_nextn_predict_layers=1, time_step_limit=[0.0, 1.0], layers_block_type=None)


def test_fuzzed_config_fields_parse_or_raise_config_errors():
    rng, cases = budget(SEED + 1)
    names = sorted(VALID_CONFIG) + ["num_hidden_layers", "n_group", "topk_group", "moe_latent_size",
                                    "routed_scaling_factor", "layer_norm_epsilon", "bos_token_id", "pad_token_id",
                                    "mamba_dt_limit", "norm_eps", "tie_word_embeddings", "mlp_hidden_act",
                                    "n_shared_experts", "layer_types", "mtp_layers_block_type", "unknown_field"]
    parsed = refused = 0
    for _ in cases:
        config = dict(VALID_CONFIG)
        for _ in range(rng.randrange(1, 4)):
            name = rng.choice(names)
            if rng.random() < 0.15:
                config.pop(name, None)
            else:
                config[name] = rng.choice([random_value(rng), "M*-E", ["mamba", "moe"], ["attention", "x"], [0, 1]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = from_hf_config(config)
            except NemojaxError:
                refused += 1
                continue
        assert isinstance(result, ModelConfig)
        for field in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "mamba_num_heads"):
            assert 0 < getattr(result, field) <= INT32_MAX
        parsed += 1
    assert parsed > 10 and refused > 10, (parsed, refused)


def test_fuzzed_safetensors_headers_open_or_raise_checkpoint_errors(tmp_path):
    rng, cases = budget(SEED + 2)
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.int64)},
              tmp_path / "clean.safetensors")
    clean = (tmp_path / "clean.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", clean[:8])
    header, data = json.loads(clean[8:8 + size]), clean[8 + size:]
    directory = tmp_path / "model"
    directory.mkdir()
    opened = refused = 0
    for _ in cases:
        edited = json.loads(json.dumps(header))
        for _ in range(rng.randrange(1, 3)):
            entry = rng.choice(["a", "b", "__metadata__", "c"])
            if isinstance(edited.get(entry), dict) and entry != "__metadata__" and rng.random() < 0.8:
                edited[entry][rng.choice(["dtype", "shape", "data_offsets", "x"])] = rng.choice(
                    [random_value(rng), "F16", "BF16", "U8", [3, 4], [0, 48], [48, 64], [0, 10**15], [-1]])
            else:
                edited[entry] = random_value(rng)
        blob = json.dumps(edited, allow_nan=True).encode()
        if rng.random() < 0.2:
            at = rng.randrange(len(blob))
            blob = blob[:at] + bytes([rng.randrange(256)]) + blob[at + 1:]
        length = len(blob) if rng.random() < 0.8 else rng.randrange(2**64)
        body = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.2 else data
        (directory / "model.safetensors").write_bytes(struct.pack("<Q", length) + blob + body)
        try:
            st = SafetensorsDir(directory)
        except NemojaxError:
            refused += 1
            continue
        for key in st.keys():  # whatever opened must read within the file
            np.asarray(st.read(key)).sum()
        opened += 1
    assert opened > 5 and refused > 10, (opened, refused)
    os.remove(directory / "model.safetensors")
