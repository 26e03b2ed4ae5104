"""Probes of the planner (subprocesses) and of load_pretrained / load_model (in this process)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Callable

import fixtures
from fixtures import Fixtures
from runner import (
    OOM,
    REFUSED,
    SERVED,
    TRACEBACK,
    UNNAMED,
    VALID_REFUSED,
    WRONG,
    Result,
    judge_refusal,
    judge_valid,
    probe,
    subprocess_run,
    truncate_safetensors,
    write,
)


# --------------------------------------------------------------------------------------- python -m nemojax.plan
def plan_run(*args: str, timeout: float = 300) -> Result:
    return subprocess_run([sys.executable, "-m", "nemojax.plan", *args], timeout=timeout)


def plan_refuse(name: str, args: list[str], named: list[str]) -> None:
    probe("plan", name)(lambda fx: judge_refusal(plan_run(*args), *named))


def plan_valid(name: str, args: Callable[[Fixtures], list[str]], check: Callable[[Result], str | None]) -> None:
    @probe("plan", name)
    def run(fx):
        r = plan_run(*args(fx))
        return judge_valid(r, lambda: check(r))


plan_refuse("a million tensor shards", ["tiny", "--mesh", "tensor=1000000"], ["tensor"])
plan_refuse("devices 0", ["tiny", "--devices", "0", "--no-compile"], ["--devices"])
plan_refuse("devices -1", ["tiny", "--devices", "-1", "--no-compile"], ["--devices"])
plan_refuse("mesh not multiplying to devices", ["tiny", "--mesh", "tensor=3", "--devices", "8", "--no-compile"],
            ["--devices"])
plan_refuse("mesh axis typo", ["tiny", "--mesh", "pipeline=2", "--no-compile"], ["pipeline"])
plan_refuse("mesh size 0", ["tiny", "--mesh", "tensor=0", "--no-compile"], ["tensor"])
plan_refuse("more expert shards than experts", ["tiny", "--mesh", "expert=1024", "--no-compile"], ["expert"])
plan_refuse("more tensor shards than heads", ["tiny", "--mesh", "tensor=64", "--no-compile"], ["tensor"])
plan_refuse("batch 0", ["tiny", "--batch", "0", "--no-compile"], ["--batch"])
plan_refuse("batch beyond int32", ["tiny", "--batch", str(10**12), "--no-compile"], ["--batch"])
plan_refuse("seq-len beyond int32", ["tiny", "--seq-len", str(10**12), "--no-compile"], ["--seq-len"])
plan_refuse("prefill chunk 0", ["tiny", "--prefill-chunk", "0", "--no-compile"], ["--prefill-chunk"])
plan_refuse("fp8 weights for training", ["tiny", "--weights", "fp8", "--train", "--no-compile"], ["--weights"])
plan_refuse("unknown model", ["no-such-model", "--no-compile"], ["no-such-model"])
plan_refuse("config.json not JSON", ["/dev/null/config.json", "--no-compile"], ["config.json"])
probe("plan", "config.json garbage")(lambda fx: judge_refusal(plan_run(
    write(os.path.join(fx.scratch("plangarbage"), "config.json"), b"{oops"), "--no-compile"), "config.json"))
probe("plan", "config file without a model block")(lambda fx: judge_refusal(plan_run(
    write(os.path.join(fx.scratch("nomodel"), "c.py"), b"import ml_collections\ndef get_config():\n"
          b"    return ml_collections.ConfigDict(dict(num_steps=3))\n"), "--no-compile"), "model"))
plan_valid("nemojax model directory", lambda fx: [fx.model, "--no-compile", "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")
plan_valid("training workdir", lambda fx: [fx.workdir, "--no-compile", "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")
plan_valid("training step directory", lambda fx: [os.path.join(fx.workdir, "checkpoints", "2"), "--no-compile",
                                                   "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")
plan_valid("Hugging Face directory", lambda fx: [fx.hf, "--no-compile", "--json"],
           lambda r: None if json.loads(r.out)["params_total"] > 0 else "no parameters")


@probe("plan", "config.json with an unknown field")
def _plan_extra(fx):
    d = fx.scratch("planextra")
    json.dump({**fx.hf_config, "my_extra_field": 1}, open(os.path.join(d, "config.json"), "w"))
    r = plan_run(os.path.join(d, "config.json"), "--no-compile")
    return judge_valid(r, lambda: None if "my_extra_field" in r.err else "the unknown field is not named")


# ------------------------------------------------------------------------------------------ load_pretrained
def load_probe(name: str, edit: Callable[[str], str | None], named: Callable[[str], list[str]],
               expect: str = "refuse", **kwargs) -> None:
    @probe("load", name)
    def run(fx):
        import nemojax
        from nemojax.errors import NemojaxError

        path = fx.hf_copy(name.replace(" ", "-")[:40])
        target = edit(path) or path
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                nemojax.load_pretrained(target, **kwargs)
            except NemojaxError as e:
                if expect == "valid":
                    return VALID_REFUSED, str(e)[:150]
                missing = [n for n in named(path) if n not in str(e)]
                return (UNNAMED, f"missing {missing}: {str(e)[:150]}") if missing else (REFUSED, str(e)[:150])
            except MemoryError:
                return OOM, ""
            except Exception as e:  # noqa: BLE001
                return TRACEBACK, f"{type(e).__name__}: {str(e)[:150]}"
        if expect == "refuse":
            return WRONG, "loaded"
        said = " ".join(str(w.message) for w in caught)
        missing = [n for n in named(path) if n not in said]
        return (WRONG, f"no warning naming {missing}") if missing else (SERVED, said[:150])


def edit_config(**changes):
    def edit(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg.update(changes)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return edit


def drop_config(*names):
    def edit(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        for n in names:
            cfg.pop(n)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return edit


def header_edit(fn):
    return lambda path: fixtures.rewrite_header(os.path.join(path, "model.safetensors"), fn)


def tensor_edit(field, value):
    def fn(h):
        h[fixtures.first_tensor(h)][field] = value
        return h
    return header_edit(fn)


def index_file(content) -> Callable[[str], None]:
    def edit(path):
        blob = content if isinstance(content, bytes) else json.dumps(content).encode()
        write(os.path.join(path, "model.safetensors.index.json"), blob)
    return edit


ST = lambda p: ["model.safetensors"]  # noqa: E731
load_probe("path missing", lambda p: "/nonexistent/model", lambda p: ["/nonexistent/model"])
load_probe("path is a file", lambda p: os.path.join(p, "config.json"), lambda p: ["config.json"])
load_probe("config.json not JSON", lambda p: write(os.path.join(p, "config.json"), b"{oops") and None,
           lambda p: ["config.json"])
load_probe("config.json is a list", lambda p: write(os.path.join(p, "config.json"), b"[1]") and None,
           lambda p: ["config.json"])
load_probe("config.json not UTF-8", lambda p: write(os.path.join(p, "config.json"), b'{"a": "\xff"}') and None,
           lambda p: ["config.json"])
load_probe("pattern is a number", edit_config(hybrid_override_pattern=5), lambda p: ["hybrid_override_pattern"])
load_probe("pattern letter unknown", edit_config(hybrid_override_pattern="MX*"), lambda p: ["hybrid_override_pattern"])
load_probe("eos id a string", edit_config(eos_token_id="x"), lambda p: ["eos_token_id"])
load_probe("eos id negative", edit_config(eos_token_id=-5), lambda p: ["eos_token_id"])
load_probe("vocab size a float", edit_config(vocab_size=300.5), lambda p: ["vocab_size"])
load_probe("vocab size beyond int32", edit_config(vocab_size=3 * 10**9), lambda p: ["vocab_size"])
load_probe("hidden size missing", drop_config("hidden_size"), lambda p: ["hidden_size"])
load_probe("layer count disagrees", edit_config(num_hidden_layers=7), lambda p: ["num_hidden_layers"])
load_probe("head_dim 0", edit_config(head_dim=0), lambda p: ["head_dim"])
load_probe("layers_block_type unknown name",
           lambda p: (drop_config("hybrid_override_pattern")(p), edit_config(layers_block_type=["mamba", "rnn"])(p))
           and None, lambda p: ["rnn"])
load_probe("time_step_limit a string", edit_config(time_step_limit="big"), lambda p: ["time_step_limit"])
load_probe("MTP layer count a string", edit_config(num_nextn_predict_layers="one"), lambda p: ["num_nextn"])
load_probe("routed scaling NaN", lambda p: write(os.path.join(p, "config.json"), json.dumps(
    {**json.load(open(os.path.join(p, "config.json"))), "routed_scaling_factor": float("nan")}).encode()) and None,
           lambda p: ["routed_scaling_factor"])
load_probe("unknown config field (published configs carry extras)", edit_config(my_extra_field=1),
           lambda p: ["my_extra_field"], expect="valid")
load_probe("eos list empty", edit_config(eos_token_id=[]), lambda p: ["eos_token_id"])
load_probe("safetensors truncated", truncate_safetensors, ST)
load_probe("safetensors empty file", lambda p: write(os.path.join(p, "model.safetensors"), b"") and None, ST)
load_probe("safetensors header longer than the file", lambda p: write(
    os.path.join(p, "model.safetensors"), (10**9).to_bytes(8, "little") + b"{}") and None, ST)
load_probe("safetensors header not JSON", header_edit(lambda h: b"{not json"), ST)
load_probe("safetensors header a list", header_edit(lambda h: b"[1, 2]"), ST)
load_probe("safetensors header not UTF-8", header_edit(lambda h: b'{"\xff": 1}'), ST)
load_probe("safetensors entry without dtype", header_edit(
    lambda h: {**h, fixtures.first_tensor(h): {"shape": [1], "data_offsets": [0, 4]}}), ST)
load_probe("safetensors entry not an object", header_edit(lambda h: {**h, fixtures.first_tensor(h): 5}), ST)
load_probe("safetensors negative shape", tensor_edit("shape", [-1, 4]), ST)
load_probe("safetensors shape a string", tensor_edit("shape", "big"), ST)
load_probe("safetensors offsets of length 1", tensor_edit("data_offsets", [0]), ST)
load_probe("safetensors offsets past the end", tensor_edit("data_offsets", [0, 10**12]), ST)
load_probe("safetensors offsets reversed", tensor_edit("data_offsets", [8, 0]), ST)
load_probe("safetensors offsets disagree with the shape", tensor_edit("data_offsets", [0, 3]), ST)
load_probe("safetensors dtype unknown", tensor_edit("dtype", "F7"), ST)
load_probe("safetensors metadata not an object", header_edit(lambda h: {**h, "__metadata__": 5}), ST)
load_probe("index.json not JSON", index_file(b"{oops"), lambda p: ["model.safetensors.index.json"])
load_probe("index.json without weight_map", index_file({"metadata": {}}),
           lambda p: ["model.safetensors.index.json", "weight_map"])
load_probe("index.json weight_map a list", index_file({"weight_map": ["model.safetensors"]}),
           lambda p: ["weight_map"])
load_probe("index.json names a missing shard", index_file({"weight_map": {"lm_head.weight": "model-2.safetensors"}}),
           lambda p: ["model-2.safetensors"])
load_probe("index.json shard outside the directory", index_file({"weight_map": {"lm_head.weight": "../x.safetensors"}}),
           lambda p: ["../x.safetensors"])
load_probe("tensor mis-shaped", edit_config(hidden_size=64), lambda p: ["mis-shaped"])
load_probe("compute dtype int8", lambda p: None, lambda p: ["int8"], dtype="int8")
load_probe("compute dtype nonsense", lambda p: None, lambda p: ["float99"], dtype="float99")


@probe("load", "load_model: workdir whose newest checkpoint is corrupt")
def _load_corrupt(fx):
    from nemojax.checkpoint.orbax import load_model
    path = fx.workdir_copy("loadcorrupt")
    fixtures.corrupt_step(path, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                load_model(path)
        except Exception as e:  # noqa: BLE001
            return (VALID_REFUSED if "NemojaxError" in str(type(e).__mro__) else TRACEBACK), str(e)[:150]
    said = " ".join(str(w.message) for w in caught) + err.getvalue()
    return (SERVED, said[:150]) if "3" in said else (WRONG, "loaded without naming the corrupt step")
