"""serve.py on bad input: bad flags and paths are refused before any work (exit 2, the input named, no
traceback, nothing written); every input line, blank or bad, gets exactly one record naming its physical
line while the good lines around it are served; finished records survive a full disk or an interrupt, and
--resume finishes the file exactly as an uninterrupted run would have."""

import errno
import json
import os
import shutil
import threading

import jax
import pytest

from nemojax.checkpoint.orbax import save_model
from nemojax.cli.serve import main
from nemojax.config import from_hf_config
from nemojax.generate import engine as engine_module
from nemojax.generate import jsonl
from nemojax.model import init_variables
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.xdist_group("bad_input_serve")  # one worker: the module fixtures are built once
CONTEXT = 40
TINY = dict(vocab_size=300, hidden_size=32, hybrid_override_pattern="M*", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=8, max_position_embeddings=CONTEXT, eos_token_id=2, compute_dtype="float32",
            param_dtype="float32")
GOOD = [json.dumps({"prompt": "hello world"}), json.dumps({"input_ids": [20, 21, 22], "max_new_tokens": 2}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "seed": 3})]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each serve.py run builds a new engine: its programs come back from the persistent cache."""
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                  "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for key, value in saved.items():
        jax.config.update(key, value)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(model with a tokenizer, the same model without one)."""
    config = from_hf_config(TINY)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    with_tokenizer, bare = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("bare")
    save_model(with_tokenizer, config, variables)
    save_model(bare, config, variables)
    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello there"] * 20
    save_tokenizer(train_tokenizer(texts, 300), str(with_tokenizer))
    return str(with_tokenizer), str(bare)


@pytest.fixture
def generate_calls(monkeypatch):
    """How many batches the engine generated (work that a late refusal would throw away)."""
    calls = []
    original = engine_module.Engine.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "generate", counted)
    return calls


def serve(checkpoint, prompts, output, *extra):
    return main(["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(output),
                 "--max-new-tokens", "3", "--batch-size", "2", "--no-progress", *extra])


def records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8").read().split("\n") if line]


def served(record):
    return "output_ids" in record and "error" not in record


@pytest.mark.parametrize("case, extra, named", [
    ("prompts missing", ["--prompts", "/nonexistent/in.jsonl"], "/nonexistent/in.jsonl"),
    ("prompts a directory", ["--prompts", "{dir}"], "{dir}"),
    ("output dir missing", ["--output", "{dir}/missing/out.jsonl"], "{dir}/missing"),
    ("output under a file", ["--output", "{dir}/in.jsonl/out.jsonl"], "in.jsonl/out.jsonl"),
    ("output a directory", ["--output", "{dir}"], "is a directory"),
    ("output is the prompts", ["--output", "{dir}/in.jsonl"], "prompts file"),
    ("output path empty", ["--output", ""], "--output"),
    ("chat template does not parse", ["--checkpoint", "{bad_template}"], "tokenizer_config.json"),
    ("stats dir missing", ["--stats", "{dir}/missing/s.json"], "--stats"),
    ("checkpoint missing", ["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ("temperature nan", ["--temperature", "nan"], "--temperature"),
    ("temperature negative", ["--temperature", "-1"], "--temperature"),
    ("top-p zero", ["--top-p", "0"], "--top-p"),
    ("top-p infinite", ["--top-p", "inf"], "--top-p"),
    ("min-p above one", ["--min-p", "2"], "--min-p"),
    ("empty stop string", ["--stop", ""], "--stop"),
    ("stop without a tokenizer", ["--stop", "x", "--checkpoint", "{bare}"], "tokenizer"),
    ("top-k beyond int32", ["--top-k", str(10**13)], "--top-k"),
    ("thinking budget beyond int32", ["--thinking-budget", str(10**13)], "--thinking-budget"),
    ("a million draft tokens", ["--speculative", "mtp", "--num-draft-tokens", "1000000"], "--num-draft-tokens"),
    ("batch size zero", ["--batch-size", "0"], "--batch-size"),
    ("dtype int8", ["--dtype", "int8"], "int8"),
    ("dtype unknown", ["--dtype", "float99"], "float99"),
    ("mesh axis typo", ["--mesh", "tensr=2"], "tensr"),
])
def test_bad_flags_are_refused_before_any_work(model_dirs, tmp_path, capsys, generate_calls, case, extra, named):
    model, bare = model_dirs
    (tmp_path / "in.jsonl").write_text("\n".join(GOOD) + "\n")
    bad_template = tmp_path / "bad_template"
    shutil.copytree(model, bad_template)
    (bad_template / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in %}"}))
    fill = dict(dir=str(tmp_path), bare=bare, bad_template=str(bad_template))
    argv = ["--checkpoint", model, "--prompts", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--no-progress"] + [a.format(**fill) for a in extra]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's range checks exit 2 with the flag named
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert named.format(**fill) in err and "Traceback" not in err
    assert not generate_calls and not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.partial").exists()


BAD_LINES = [  # (line, words its error record must hold besides "line N")
    ("", "blank"),
    ("   \t", "blank"),
    ("{not json", "JSON"),
    ("[1, 2]", "object"),
    ("null", "object"),
    ("[" * 50000 + "]" * 50000, "nested"),
    ('{"prompt": "x", "n": ' + "9" * 5000 + "}", "JSON"),
    (json.dumps({"prompt": "hi", "top_k": 10**13}), "top_k"),
    (json.dumps({"prompt": "hi", "thinking_budget": 10**13}), "thinking_budget"),
    ('{"prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ('{"prompt": "hi", "top_p": NaN}', "top_p"),
    ('{"prompt": "hi", "min_p": -Infinity}', "min_p"),
    (json.dumps({"prompt": "hi", "top_p": 10**400}), "top_p"),
    (json.dumps({"prompt": "hi", "stop": ""}), "stop"),
    (json.dumps({"prompt": "hi", "stop": ["a", ""]}), "stop"),
    (json.dumps({"prompt": "hi", "temprature": 0.5}), "did you mean 'temperature'"),
    (json.dumps({"prompt": "hi", "max_tokens": 5}), "max_tokens"),
    (json.dumps({"prompt": "hi", "input_ids": [5]}), "exactly one"),
    (json.dumps({"prompt": ""}), "empty"),
    (json.dumps({"input_ids": [5, True]}), "input_ids"),
    (json.dumps({"input_ids": [5, 10**30]}), str(10**30)),
    (json.dumps({"input_ids": list(range(20, 20 + CONTEXT))}), str(CONTEXT)),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "robot"),
    ('{"prompt": "a\\ud800b"}', "surrogate"),
    (json.dumps({"prompt": "hi", "max_new_tokens": 0}), "max_new_tokens"),
    (json.dumps({"prompt": "hi", "ignore_eos": "yes"}), "ignore_eos"),
]
VALID_ODD_LINES = [  # valid lines that a careless reader splits, drops or misreads
    json.dumps({"prompt": "one\u2028two\u0085three\u2029four\x0cfive"}, ensure_ascii=False),
    json.dumps({"prompt": "crlf"}) + "\r",
    json.dumps({"prompt": "hi", "max_new_tokens": 10**13}),
    json.dumps({"prompt": "hi", "seed": 10**30, "temperature": 0.5}),
    json.dumps({"prompt": "hi", "top_k": 10**6, "temperature": 0.5}),
    json.dumps({"prompt": "hi", "stop": []}),
]


def test_every_line_gets_one_record_and_bad_lines_never_stop_the_file(model_dirs, tmp_path):
    lines, expected = [], []
    for i, (bad, words) in enumerate(BAD_LINES):
        lines += [GOOD[i % 3], bad]
        expected += [None, words]
    lines += VALID_ODD_LINES
    expected += [None] * len(VALID_ODD_LINES)
    content = "\n".join(lines).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n' + b"x" * 20 + b"\n"
    expected += ["UTF-8", "JSON"]
    (tmp_path / "in.jsonl").write_bytes(content)
    assert serve(model_dirs[0], tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--batch-size", "8") == 0
    got = records(tmp_path / "out.jsonl")
    assert len(got) == len(expected)
    for number, (record, words) in enumerate(zip(got, expected, strict=True), start=1):
        if words is None:
            assert served(record), (number, record)
            assert 1 <= len(record["output_ids"]) <= (CONTEXT if "10000000000000" in lines[number - 1] else 3)
        else:
            assert record["error"].startswith(f"line {number}: ") and words in record["error"], (number, record)
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_full_disk_keeps_finished_records_and_resume_matches_an_uninterrupted_run(model_dirs, tmp_path, capsys,
                                                                                   monkeypatch):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(GOOD[i % 3] if i % 4 else "" for i in range(1, 13)) + "\n")
    assert serve(model_dirs[0], prompts, tmp_path / "whole.jsonl") == 0
    whole = records(tmp_path / "whole.jsonl")

    syncs = []
    real_fsync = os.fsync

    def fsync_until_full(fd):
        syncs.append(fd)
        if len(syncs) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(jsonl.os, "fsync", fsync_until_full)
    out = tmp_path / "out.jsonl"
    assert serve(model_dirs[0], prompts, out) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "out.jsonl.partial" in err and "--resume" in err and "Traceback" not in err
    kept = records(str(out) + ".partial")
    assert 2 <= len(kept) < len(whole) and kept == whole[:len(kept)] and not out.exists()

    monkeypatch.setattr(jsonl.os, "fsync", real_fsync)
    assert serve(model_dirs[0], prompts, out) == 2  # without --resume the kept records are never overwritten
    assert "--resume" in capsys.readouterr().err and records(str(out) + ".partial") == kept
    assert serve(model_dirs[0], prompts, out, "--resume") == 0
    assert records(out) == whole and not os.path.exists(str(out) + ".partial")


def test_interrupt_keeps_finished_batches_and_resume_serves_only_the_rest(model_dirs, tmp_path, capsys, monkeypatch,
                                                                         generate_calls):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(GOOD[i % 3] for i in range(10)) + "\n")
    out = tmp_path / "out.jsonl"
    counted = engine_module.Engine.generate

    def interrupted_third_batch(self, *args, **kwargs):
        if len(generate_calls) == 2:
            raise KeyboardInterrupt
        return counted(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "generate", interrupted_third_batch)
    assert serve(model_dirs[0], prompts, out) == 130
    assert "--resume" in capsys.readouterr().err
    kept = records(str(out) + ".partial")
    assert len(kept) == 4 and all(served(r) for r in kept)  # two batches of two, in input order

    monkeypatch.setattr(engine_module.Engine, "generate", counted)
    generate_calls.clear()
    assert serve(model_dirs[0], prompts, out, "--resume") == 0
    assert len(generate_calls) == 3  # the six remaining lines only
    final = records(out)
    assert len(final) == 10 and final[:4] == kept and all(served(r) for r in final)

    prompts.write_text("\n".join(GOOD[:2]) + "\n")  # a shorter prompt file: this output is not its own
    assert serve(model_dirs[0], prompts, out, "--resume") == 2
    assert "another prompt file" in capsys.readouterr().err and len(records(out)) == 10


def test_prompts_from_a_pipe_are_served(model_dirs, tmp_path):
    """A pipe is read once, line by line (no count ahead, no second pass)."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as f:
            f.write("\n".join(GOOD[:2]) + "\n\n")

    threading.Thread(target=feed, daemon=True).start()
    assert serve(model_dirs[0], fifo, tmp_path / "out.jsonl") == 0
    got = records(tmp_path / "out.jsonl")
    assert len(got) == 3 and served(got[0]) and served(got[1]) and got[2]["error"].startswith("line 3: blank")
