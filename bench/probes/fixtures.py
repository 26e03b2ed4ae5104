"""Tiny checkpoints, workdirs and corrupted copies for the bad-input probes (bench/probes/bad_inputs.py).

Everything is built once under one scratch directory: a nemojax model directory with a tokenizer (and MTP),
the same without a tokenizer, a Hugging Face directory (published layout, no MTP), and a training workdir
with checkpoints at steps 1, 2 and 3.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax

from nemojax.checkpoint.hf import save_pretrained
from nemojax.checkpoint.orbax import save_model
from nemojax.config import from_hf_config
from nemojax.model import init_variables
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")
CONTEXT = 48
TINY = dict(vocab_size=300, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=8, intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16, mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
            max_position_embeddings=CONTEXT, eos_token_id=2, compute_dtype="float32", param_dtype="float32")
TEXTS = ["the quick brown fox jumps over the lazy dog", "a model of words and numbers 0123456789",
         "hello world, hello there; general kenobi"] * 20
# Training overrides: the tiny config's layer kinds at small widths, a few steps, a checkpoint every step.
SMALL_TRAIN = [
    "--config.model.vocab_size=512", "--config.model.hidden_size=32", "--config.model.num_attention_heads=2",
    "--config.model.num_key_value_heads=1", "--config.model.head_dim=16", "--config.model.mamba_num_heads=4",
    "--config.model.mamba_head_dim=8", "--config.model.ssm_state_size=8", "--config.model.chunk_size=16",
    "--config.model.intermediate_size=64", "--config.model.n_routed_experts=4",
    "--config.model.num_experts_per_tok=2", "--config.model.n_group=1", "--config.model.topk_group=1",
    "--config.model.moe_intermediate_size=16", "--config.model.moe_shared_expert_intermediate_size=16",
    "--config.model.moe_latent_size=16", "--config.data.vocab_size=512", "--config.data.max_corpus_bytes=100000",
    "--config.batch_size=2", "--config.seq_len=32", "--config.num_steps=3", "--config.log_every=1",
    "--config.eval_every=100", "--config.eval_batches=1", "--config.checkpoint_every=1",
    "--config.keep_checkpoints=3", "--compilation-cache", "",
]


class Fixtures:
    """Paths of the shared probe inputs (built on construction)."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        config = from_hf_config(TINY)
        variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
        self.model = os.path.join(root, "model")
        save_model(self.model, config, variables)
        self.tokenizer = save_tokenizer(train_tokenizer(TEXTS, 300), self.model)
        self.model_no_tokenizer = os.path.join(root, "model-no-tokenizer")
        save_model(self.model_no_tokenizer, config, variables)
        plain = from_hf_config({**TINY, "num_nextn_predict_layers": 0, "mtp_hybrid_override_pattern": ""})
        self.hf = os.path.join(root, "hf")
        save_pretrained(self.hf, plain, jax.jit(init_variables, static_argnums=0)(plain, jax.random.key(1)))
        self.hf_config = json.load(open(os.path.join(self.hf, "config.json")))
        self.workdir = os.path.join(root, "workdir")
        self.train_tokenizer = os.path.join(root, "train-tokenizer")
        save_tokenizer(train_tokenizer([open(shutil.__file__).read()], 512), self.train_tokenizer)
        from nemojax.cli.train import main as train_main

        status = train_main(["--config", TINY_CONFIG, "--workdir", self.workdir, *SMALL_TRAIN,
                             f"--config.data.tokenizer_path={self.train_tokenizer}/tokenizer.json"])
        assert status == 0, "the probe workdir did not train"
        self._count = 0

    def scratch(self, name: str) -> str:
        """A new empty directory for one probe."""
        self._count += 1
        path = os.path.join(self.root, "probes", f"{self._count:03d}-{name}")
        os.makedirs(path)
        return path

    def hf_copy(self, name: str) -> str:
        path = os.path.join(self.scratch(name), "hf")
        shutil.copytree(self.hf, path)
        return path

    def workdir_copy(self, name: str) -> str:
        path = os.path.join(self.scratch(name), "workdir")
        shutil.copytree(self.workdir, path)
        return path


def rewrite_header(path: str, edit) -> None:
    """Apply `edit(header_dict) -> header_dict or bytes` to a safetensors file's JSON header, keeping the data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    new = edit(header)
    blob = new if isinstance(new, bytes) else json.dumps(new).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.write(data)


def first_tensor(header: dict) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def corrupt_step(workdir: str, step: int) -> None:
    """Overwrite every file of one checkpoint step's variables with garbage of the same size."""
    root = os.path.join(workdir, "checkpoints", str(step))
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(b"\x00garbage" * (size // 8 + 1))
