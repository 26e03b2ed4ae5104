"""Open whatever `--checkpoint` names: a Hugging Face directory, a nemojax model directory, or a train.py
workdir (its latest step), plus the tokenizer that travels with it (if any).

Loading is delegated to the checkpoint modules (`checkpoint.hf.load_pretrained`,
`checkpoint.orbax.load_model`); this module only decides which one applies and turns every failure
into a `CheckpointError` that names the path.
"""

from __future__ import annotations

import os

from jax.sharding import Mesh
from tokenizers import Tokenizer

from nemojax.chat import IM_END, THINK_END, THINK_START
from nemojax.chat_template import ChatTemplate
from nemojax.checkpoint import orbax
from nemojax.checkpoint.hf import load_pretrained
from nemojax.config import KV_CACHE_DTYPES
from nemojax.errors import CheckpointError, NemojaxError
from nemojax.generate.requests import Encoder
from nemojax.model import NemotronH

TOKENIZER_FILE = "tokenizer.json"


def load_checkpoint(path: str, dtype: str | None = None, mesh: Mesh | None = None,
                    kv_cache_dtype: str | None = None) -> tuple[NemotronH, dict]:
    """(model, variables) from any supported checkpoint layout, sharded onto `mesh` if given;
    CheckpointError when unreadable. `kv_cache_dtype` ("fp8" | "bf16" | "fp32", None: the compute
    dtype) sets the model's decoding-cache K/V storage."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        if orbax.is_nemojax_dir(path):
            model, variables = orbax.load_model(path, dtype=dtype, mesh=mesh)
        else:
            model, variables = load_pretrained(path, dtype=dtype, mesh=mesh)
    except NemojaxError:
        raise
    except Exception as e:  # any reader failure (corrupt JSON, truncated tensors, ...) is a bad checkpoint
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    if kv_cache_dtype is not None:
        model = NemotronH(model.config.replace(kv_cache_dtype=KV_CACHE_DTYPES[kv_cache_dtype]))
    return model, variables


def tokenizer_dir(path: str) -> str | None:
    """Where the checkpoint's tokenizer.json lives (the directory itself or a train.py workdir), if anywhere."""
    candidates = [path]
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.basename(parent) == orbax.CHECKPOINTS_DIR:  # a step directory: WORKDIR/checkpoints/<step>
        candidates.append(os.path.dirname(parent))
    return next((d for d in candidates if os.path.isfile(os.path.join(d, TOKENIZER_FILE))), None)


def load_encoder(path: str) -> tuple[Encoder, Tokenizer | None]:
    """The prompt encoder (tokenizer + chat template) of a checkpoint, and the tokenizer for decoding."""
    directory = tokenizer_dir(path)
    if directory is None:
        return Encoder(None, None), None
    try:
        tokenizer = Tokenizer.from_file(os.path.join(directory, TOKENIZER_FILE))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise CheckpointError(f"{directory}/{TOKENIZER_FILE}: cannot read the tokenizer ({e})") from e
    template = ChatTemplate.from_directory(directory)
    return (Encoder(lambda text: tokenizer.encode(text).ids, template.render,
                    (tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)), template), tokenizer)


def end_of_turn_ids(tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """`<|im_end|>` ends an assistant turn: generation stops there as at the config's eos ids."""
    if tokenizer is None or tokenizer.token_to_id(IM_END) is None:
        return ()
    return (tokenizer.token_to_id(IM_END),)
