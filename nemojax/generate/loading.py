"""Open whatever `--checkpoint` names: a Hugging Face directory, a nemojax model directory, or a train.py
workdir (its latest step), plus the tokenizer that travels with it (if any).

Loading is delegated to the checkpoint modules (`checkpoint.hf.load_pretrained`,
`checkpoint.orbax.load_model`); this module only decides which one applies and turns every failure
into a `CheckpointError` that names the path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import jinja2.sandbox
from jax.sharding import Mesh
from tokenizers import Tokenizer

from nemojax.chat import EFFORT_SUFFIX, IM_END, THINK_END, THINK_START, render_messages, validate_messages
from nemojax.checkpoint import orbax
from nemojax.checkpoint.hf import load_pretrained
from nemojax.errors import CheckpointError, DataError, NemojaxError
from nemojax.generate.requests import Encoder
from nemojax.model import NemotronH

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def load_checkpoint(path: str, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[NemotronH, dict]:
    """(model, variables) from any supported checkpoint layout, sharded onto `mesh` if given;
    CheckpointError when unreadable."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        if orbax.is_nemojax_dir(path):
            return orbax.load_model(path, dtype=dtype, mesh=mesh)
        return load_pretrained(path, dtype=dtype, mesh=mesh)
    except NemojaxError:
        raise
    except Exception as e:  # any reader failure (corrupt JSON, truncated tensors, ...) is a bad checkpoint
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e


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
    template = _chat_template(directory)
    try:
        render = render_messages_for(template) if template else _render_chatml
    except jinja2.TemplateError as e:
        raise CheckpointError(f"{directory}/{TOKENIZER_CONFIG_FILE}: the chat template does not parse ({e})") from e
    return (Encoder(lambda text: tokenizer.encode(text).ids, render,
                    (tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END))), tokenizer)


def end_of_turn_ids(tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """`<|im_end|>` ends an assistant turn: generation stops there as at the config's eos ids."""
    if tokenizer is None or tokenizer.token_to_id(IM_END) is None:
        return ()
    return (tokenizer.token_to_id(IM_END),)


def _render_chatml(messages: Sequence[Mapping[str, str]], reasoning: str) -> str:
    return render_messages(messages, add_generation_prompt=True, reasoning=reasoning)


def _chat_template(directory: str) -> str | None:
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            template = json.load(f).get("chat_template")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    return template if isinstance(template, str) else None


def render_messages_for(template: str) -> Callable[[Sequence[Mapping[str, str]], str], str]:
    """A renderer for a Jinja chat template from tokenizer_config.json (thinking on unless reasoning is off;
    the effort suffix of `medium`/`low` is appended to the last user message first, as in ChatML)."""
    compiled = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        template)

    def render(messages: Sequence[Mapping[str, str]], reasoning: str) -> str:
        validate_messages(messages)
        messages = [dict(m) for m in messages]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if users and reasoning in EFFORT_SUFFIX:
            messages[users[-1]]["content"] += EFFORT_SUFFIX[reasoning]
        try:
            return compiled.render(messages=messages, add_generation_prompt=True,
                                   enable_thinking=reasoning != "off")
        except jinja2.TemplateError as e:
            raise DataError(f"the checkpoint's chat template failed: {e}") from e

    return render
