"""serve.py end to end on a tiny nemojax checkpoint with a tokenizer: every kind of line, bad lines
reported in place, stop strings, statistics, the prefix cache's flags, and exit status 2 for unreadable
input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

import serve
from nemojax.chat import render_messages
from nemojax.checkpoint.orbax import LAYOUT_VERSION, save_model
from nemojax.cli import serve as serve_cli
from nemojax.config import from_hf_config
from nemojax.generate import Defaults, Engine
from nemojax.generate.loading import load_checkpoint, load_encoder
from nemojax.generate.serving import StopStrings
from nemojax.generate.serving import serve as serve_lines
from nemojax.model import init_variables
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.xdist_group("serve")  # module fixtures share compiled programs
CONTEXT = 48
TINY = dict(vocab_size=300, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=8, intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16, mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
            max_position_embeddings=CONTEXT, eos_token_id=2, compute_dtype="float32", param_dtype="float32")
TEXTS = ["the quick brown fox jumps over the lazy dog", "a model of words and numbers 0123456789",
         "hello world, hello there; general kenobi"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    config = from_hf_config(TINY)
    save_model(directory, config, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0)))
    save_tokenizer(train_tokenizer(TEXTS, 300), str(directory))
    return directory


def test_cli_serves_every_line_kind_and_reports_bad_lines(checkpoint, tmp_path):
    messages = [{"role": "user", "content": "hello there"}]
    lines = [
        json.dumps({"prompt": "the quick brown fox"}),
        json.dumps({"messages": messages, "thinking_budget": 2, "max_new_tokens": 6}),
        json.dumps({"input_ids": [20, 21, 22], "temperature": 0.8, "top_k": 20, "seed": 3}),
        "{not json",
        json.dumps({"input_ids": [5, 300]}),
        json.dumps({"prompt": ""}),
        json.dumps({"input_ids": list(range(20, 20 + CONTEXT))}),
        json.dumps({"text": "no prompt key"}),
        json.dumps({"messages": messages, "reasoning": "off", "ignore_eos": True}),
    ]
    prompts, output, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    prompts.write_text("\n".join(lines) + "\n")
    status = serve.main(["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(output),
                         "--max-new-tokens", "8", "--batch-size", "4", "--speculative", "mtp",
                         "--num-draft-tokens", "2", "--stats", str(stats), "--no-progress"])
    assert status == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(lines)
    errors = {i: r["error"] for i, r in enumerate(records) if "error" in r}
    assert sorted(errors) == [3, 4, 5, 6, 7]
    assert "JSON" in errors[3] and "300" in errors[4] and "empty" in errors[5]
    assert str(CONTEXT) in errors[6] and "prompt" in errors[7]
    for i in (0, 1, 2, 8):
        record = records[i]
        assert record["finish_reason"] in ("stop", "length") and isinstance(record["text"], str)
        assert 1 <= len(record["output_ids"]) <= (6 if i == 1 else 8)
        if record["finish_reason"] == "length":
            assert len(record["output_ids"]) == (6 if i == 1 else 8)
    thinking = records[1]["output_ids"]
    assert 13 in thinking[:3] or (len(thinking) < 3 and thinking[-1] in (2, 11))  # </think> forced after 2
    assert len(records[8]["output_ids"]) == 8  # --ignore-eos per line
    summary = json.loads(stats.read_text())
    assert summary["prompts"] == 4 and summary["generated_tokens"] == sum(len(records[i]["output_ids"])
                                                                         for i in (0, 1, 2, 8))
    assert summary["seconds"] > 0 and summary["prefill_tokens_per_second"] > 0
    assert summary["tokens_per_second"] == pytest.approx(summary["generated_tokens"] / summary["seconds"])
    assert 0 <= summary["acceptance_rate"] <= 1 and summary["num_draft_tokens"] == 2
    # each verification yields its accepted drafts plus one token of its own
    assert summary["mean_accepted_length"] == pytest.approx(1 + 2 * summary["acceptance_rate"])


def test_cli_prefix_cache_restores_a_shared_prompt_and_reports_it(checkpoint, tmp_path):
    """The second line extends the first (30 tokens): it restores 3 blocks of 8 and prefills the other 16;
    --stats reports it with the timings. --no-prefix-cache (or 0 GB) builds no cache."""
    first = list(range(20, 50))
    lines = [json.dumps({"input_ids": first}), json.dumps({"input_ids": first + list(range(60, 70))})]
    prompts, output, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    prompts.write_text("\n".join(lines) + "\n")
    flags = ["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(output)]
    assert serve.main(flags + ["--max-new-tokens", "2", "--batch-size", "1", "--prefix-block", "8",
                               "--prefill-chunk", "16", "--stats", str(stats), "--no-progress"]) == 0
    summary = json.loads(stats.read_text())
    assert summary["cached_tokens"] == 24 and summary["prefill_tokens"] == 30 + 16
    assert summary["prefill_seconds"] > 0 and summary["decode_seconds"] > 0 and summary["ttft_seconds"] > 0
    assert summary["decode_ms_per_token"] == pytest.approx(1000 * summary["decode_seconds"] / 2)  # 1 per request
    options = serve_cli.engine_options(serve_cli.parse_args(flags))
    assert options["prefix_cache_bytes"] == int(serve_cli.DEFAULT_PREFIX_CACHE_GB * 1e9) > 0
    model, variables = load_checkpoint(str(checkpoint))
    for off in (["--no-prefix-cache"], ["--prefix-cache-gb", "0"]):
        options = serve_cli.engine_options(serve_cli.parse_args(flags + off))
        assert options["prefix_cache_bytes"] == 0
        assert Engine(model, variables, eos_ids=(2,), **options).prefix_cache is None


def test_cli_cpu_devices_split_the_rows_and_equal_one_device(checkpoint, tmp_path, capsys):
    """--cpu-devices 2 (a fresh process: JAX starts with two host devices) decodes each device's own rows and
    writes the tokens one device writes; a batch the devices cannot share equally is refused up front."""
    lines = [json.dumps({"input_ids": list(range(20 + i, 27 + 3 * i)), "ignore_eos": True}) for i in range(4)]
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    flags = ["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--max-new-tokens", "6", "--batch-size",
             "4", "--prefill-chunk", "8", "--no-progress"]
    assert serve.main(flags + ["--output", str(tmp_path / "one.jsonl"), "--mesh", "data=1"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    stats = tmp_path / "stats.json"
    done = subprocess.run([sys.executable, serve.__file__, *flags, "--output", str(tmp_path / "two.jsonl"),
                           "--cpu-devices", "2", "--stats", str(stats)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ids = [[json.loads(line)["output_ids"] for line in (tmp_path / name).read_text().splitlines()]
           for name in ("one.jsonl", "two.jsonl")]
    assert ids[0] == ids[1] and all(len(row) == 6 for row in ids[0])
    assert json.loads(stats.read_text())["row_devices"] == 2
    assert serve.main(flags + ["--output", str(tmp_path / "three.jsonl"), "--cpu-devices", "3"]) == 2
    assert "--batch-size 4 must be a multiple of --cpu-devices 3" in capsys.readouterr().err


def test_stop_strings_cut_text_and_ids(checkpoint):
    model, variables = load_checkpoint(str(checkpoint))
    encoder, tokenizer = load_encoder(str(checkpoint))
    engine = Engine(model, variables, eos_ids=(2, 11), prefill_chunk=16)
    lines = [json.dumps({"prompt": "hello world", "ignore_eos": True})]
    (free,) = serve_lines(lines, engine, encoder, tokenizer, Defaults(max_new_tokens=10), 1)
    text = free["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    (cut,) = serve_lines(lines, engine, encoder, tokenizer, Defaults(max_new_tokens=10, stop=(stop,)), 1)
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]
    assert text.startswith(cut["text"]) and free["output_ids"][:len(cut["output_ids"])] == cut["output_ids"]
    assert stop in tokenizer.decode(cut["output_ids"], skip_special_tokens=False)
    finder = StopStrings(["fox"], tokenizer)
    ids = tokenizer.encode("the quick brown fox jumps").ids
    n, before = finder.find(ids)
    assert before == "the quick brown " and "fox" in tokenizer.decode(ids[:n]) and "fox" not in tokenizer.decode(
        ids[:n - 1])


def test_chatml_prompt_ends_in_an_open_think_block(checkpoint):
    encoder, _ = load_encoder(str(checkpoint))
    messages = [{"role": "user", "content": "hi"}]
    assert encoder.render(messages, "on") == render_messages(messages, reasoning="on")
    assert encoder.encode(encoder.render(messages, "on"))[-2:] == [12, encoder.encode("\n")[0]]
    assert encoder.render(messages, "off").endswith("<think></think>")
    assert "{reasoning effort: efficient}" in encoder.render(messages, "medium")


def test_chat_template_from_tokenizer_config(checkpoint, tmp_path):
    shutil.copy(checkpoint / "tokenizer.json", tmp_path / "tokenizer.json")
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% if enable_thinking %}<think>\n{% else %}<think></think>{% endif %}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    encoder, _ = load_encoder(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert encoder.render(messages, "on") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert encoder.render(messages, "off").endswith("assistant\n<think></think>")
    assert "hi\n\n{reasoning effort: efficient}<|im_end|>" in encoder.render(messages, "medium")


@pytest.mark.parametrize("make", ["missing", "garbage_config", "no_variables", "old_layout"])
def test_unreadable_checkpoint_exits_2(tmp_path, capsys, make):
    path = tmp_path / "ckpt"
    if make != "missing":
        path.mkdir()
        payload = {"format": "nemojax", "model": tiny_dict()}
        if make == "no_variables":
            payload["layout_version"] = LAYOUT_VERSION
        (path / "config.json").write_text("{oops" if make == "garbage_config" else json.dumps(payload))
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"input_ids": [1, 2]}) + "\n")
    status = serve.main(["--checkpoint", str(path), "--prompts", str(prompts), "--output", str(tmp_path / "o"),
                         "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(path) in err and "Traceback" not in err
    assert ("layout version" in err) == (make == "old_layout")


def tiny_dict():
    return from_hf_config(TINY).to_dict()
