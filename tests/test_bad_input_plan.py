"""The planner on bad input: meshes larger than the model can use, absurd sizes and bad configs are refused
before any device is simulated (exit 2, the input named, no traceback; run in-process, which would fail if
they got as far as simulating devices), and nemojax model directories, workdirs and step directories are
read as model configs."""

import json
import os
import subprocess
import sys

import jax
import pytest

from nemojax.checkpoint.orbax import save_model
from nemojax.config import from_hf_config, resolve_model_config
from nemojax.plan import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, hidden_size=16, hybrid_override_pattern="M*", num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=4, n_groups=1,
            chunk_size=8, eos_token_id=2, compute_dtype="float32")


@pytest.mark.parametrize("args, named", [
    (["tiny", "--mesh", "tensor=1000000"], "tensor=1000000"),
    (["tiny", "--mesh", "tensor=64", "--no-compile"], "tensor=64"),
    (["tiny", "--mesh", "expert=1024", "--no-compile"], "expert=1024"),
    (["tiny", "--mesh", "fsdp=100000", "--no-compile"], "fsdp=100000"),
    (["tiny", "--mesh", "data=4", "--batch", "2", "--no-compile"], "data=4"),
    (["ultra", "--mesh", "tensor=64,expert=128"], "--no-compile"),
    (["tiny", "--devices", "0"], "--devices"),
    (["tiny", "--devices", "-1"], "--devices"),
    (["tiny", "--mesh", "tensor=2", "--devices", "8"], "--devices"),
    (["tiny", "--mesh", "pipeline=2"], "pipeline"),
    (["tiny", "--mesh", "tensor=0"], "tensor"),
    (["tiny", "--batch", "0"], "--batch"),
    (["tiny", "--batch", str(10**12)], "--batch"),
    (["tiny", "--seq-len", str(10**12)], "--seq-len"),
    (["tiny", "--batch", "100000", "--seq-len", "100000"], "--seq-len"),
    (["tiny", "--prefill-chunk", "0"], "--prefill-chunk"),
    (["tiny", "--seq-len", "64", "--prefill-chunk", "128"], "--prefill-chunk"),
    (["tiny", "--weights", "fp8", "--train"], "--weights"),
    (["no-such-model"], "no-such-model"),
    (["/dev/null/config.json"], "config.json"),
    (["{garbage}"], "config.json"),
    (["{unknown_format}"], "vocab_size"),
    (["{no_model}"], "`model`"),
])
def test_bad_plan_input_is_refused_before_simulating_devices(tmp_path, capsys, args, named):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{oops")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"format": "other"}))
    no_model = tmp_path / "no_model.py"
    no_model.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({})\n")
    fill = dict(garbage=str(garbage), unknown_format=str(unknown), no_model=str(no_model))
    try:
        status = main([a.format(**fill) for a in args])
    except SystemExit as e:  # argparse's range checks exit 2 with the flag named
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert named in err and "Traceback" not in err


def test_nemojax_model_dirs_workdirs_and_step_dirs_are_model_configs(tmp_path):
    config = from_hf_config(TINY)
    variables = jax.jit(lambda: {"params": {}, "buffers": {}})()
    save_model(tmp_path / "model", config, variables)
    step_dir = tmp_path / "workdir" / "checkpoints" / "7"
    step_dir.mkdir(parents=True)
    (tmp_path / "workdir" / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    for path in (tmp_path / "model", tmp_path / "workdir", step_dir):
        assert resolve_model_config(path) == config
    run = subprocess.run([sys.executable, "-m", "nemojax.plan", str(tmp_path / "workdir"), "--no-compile", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["params_total"] > 0 and plan["devices"] == 8
