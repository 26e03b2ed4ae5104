"""Bounds for the serving benchmark: what a decode step must move, what a prefill must compute, and
what this machine can do (memory bandwidth, matmul peak), measured in the same run.

- `decode_step_bytes`: bytes one greedy decoding step of the main model must move: every weight of
  the main stack once (embeddings: only the rows looked up; routed experts: only the distinct experts
  the batch is routed to, per layer), the valid part of each attention layer's KV cache plus the new
  entries, and each Mamba layer's conv and SSM state read and written back. A step cannot run faster
  than these bytes over the measured read bandwidth.
- `decode_step_flops`, `prefill_flops`: the useful floating-point work (multiply-add = 2 FLOPs) of the
  matmuls, the causal part of attention (each query against the keys it sees) and the chunked SSD
  scan, as the reference computes them; routed experts count top-k per token.
- `prefill_matmul_shapes`, `matmuls_alone`: the prefill's plain matrix products and one program running
  only them: a floor on a prefill's time from matmul speed alone.
- `distinct_experts`: the routing of generated text, per MoE layer and decoding position, read from a
  teacher-forced forward of the generated sequences.
- `measured_bandwidth`, `measured_matmul_peak`: a large float32 reduction and a large float32 matmul.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.model import NemotronH, abstract_variables
from nemojax.model.moe import Router
from nemojax.planning.counts import is_mtp, is_routed_expert, leaf_paths, size_of


def _leaves(config: ModelConfig) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    return [(p, x) for p, x in leaf_paths(abstract_variables(config)["params"]) if not is_mtp(p)]


def decode_step_bytes(config: ModelConfig, batch: int, context: float, distinct_per_moe_layer: list[float],
                      cache_dtype_bytes: int = 4) -> dict[str, float]:
    """Bytes a decoding step of `batch` rows at `context` cached tokens must move (see module docstring).

    `distinct_per_moe_layer`: how many distinct experts the batch is routed to in each MoE layer.
    """
    c = config
    moe_layers = [i for i, kind in enumerate(c.layer_types) if kind == "moe"]
    distinct = {f"backbone/layers_{i}/": n for i, n in zip(moe_layers, distinct_per_moe_layer, strict=True)}
    dense = routed = 0.0
    for path, leaf in _leaves(config):
        nbytes = size_of(leaf) * np.dtype(leaf.dtype).itemsize
        if path.startswith("backbone/embeddings/"):
            dense += batch * nbytes / leaf.shape[0]
        elif is_routed_expert(path):
            layer = path[:path.index("/mixer/") + 1]
            routed += distinct[layer] * nbytes / leaf.shape[0]
        else:
            dense += nbytes
    kinds = c.layer_types
    kv_per_token = 2 * c.num_key_value_heads * c.head_dim * cache_dtype_bytes + 1  # K, V and the valid flag
    kv = kinds.count("attention") * batch * kv_per_token * (context + 1)
    ssm = kinds.count("mamba") * batch * 2 * (
        c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size * 4
        + (c.conv_kernel - 1) * c.mamba_conv_dim * cache_dtype_bytes)
    return {"dense_weights": dense, "routed_experts": routed, "kv_cache": kv, "ssm_state": ssm,
            "total": dense + routed + kv + ssm}


def _matmul_params_per_token(config: ModelConfig) -> tuple[int, int]:
    """(dense matmul weights a token goes through, lm_head weights): Linear kernels and routers, the
    depthwise conv, and top-k of each MoE layer's routed experts."""
    dense = head = 0
    for path, leaf in _leaves(config):
        if path.startswith("lm_head/"):
            head += size_of(leaf)
        elif is_routed_expert(path):
            dense += size_of(leaf) // leaf.shape[0] * config.num_experts_per_tok
        elif path.endswith("kernel") or path.endswith("conv1d/weight"):
            dense += size_of(leaf)
    return dense, head


def _ssd_flops_per_token(config: ModelConfig, causal_pairs_per_token: float) -> float:
    """The chunked scan per token: C.B and the decayed in-chunk sum over the causal pairs, chunk states in
    and out (float32 work the Mamba layer does besides its projections)."""
    c = config
    heads_dim = c.mamba_num_heads * c.mamba_head_dim
    return 2 * (causal_pairs_per_token * (c.n_groups * c.ssm_state_size + heads_dim)
                + 2 * heads_dim * c.ssm_state_size)


def prefill_flops(config: ModelConfig, batch: int, prompt: int) -> float:
    """Useful FLOPs of a prefill of `batch` prompts of `prompt` tokens (logits at the last position only)."""
    c = config
    dense, head = _matmul_params_per_token(config)
    tokens = batch * prompt
    flops = 2.0 * tokens * dense + 2.0 * batch * head
    visible = (prompt + 1) / 2  # mean keys a causal query sees
    flops += c.layer_types.count("attention") * 4.0 * tokens * c.num_attention_heads * c.head_dim * visible
    chunk = min(c.chunk_size, prompt)
    flops += c.layer_types.count("mamba") * tokens * _ssd_flops_per_token(config, (chunk + 1) / 2)
    return flops


def prefill_matmul_shapes(config: ModelConfig, batch: int, prompt: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of the plain matrix products a prefill must run: every Linear kernel (routers
    included) over all tokens, each routed-expert projection as one product over the tokens' top-k
    copies (an ideal grouping with no padding), the lm_head at one position per row. The depthwise conv,
    the SSD scan and attention are left out: what is left is a floor set by matmul speed alone."""
    tokens, shapes = batch * prompt, []
    for path, leaf in _leaves(config):
        if is_routed_expert(path):
            shapes.append((tokens * config.num_experts_per_tok, *leaf.shape[-2:]))
        elif path.endswith("kernel"):
            shapes.append((batch if path.startswith("lm_head/") else tokens, *leaf.shape))
    return shapes


def matmuls_alone(shapes: list[tuple[int, int, int]]) -> tuple[object, tuple, float]:
    """(jitted program, its arguments, its FLOPs): the products `shapes` on random float32 operands in one
    program, as XLA runs them (each result reduced to a scalar, so that none is skipped)."""
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    operands = [(jax.random.normal(keys[2 * i], (m, k), jnp.float32),
                 jax.random.normal(keys[2 * i + 1], (k, n), jnp.float32)) for i, (m, k, n) in enumerate(shapes)]
    program = jax.jit(lambda operands: [jnp.sum(a @ w) for a, w in operands])
    return program, (operands,), float(sum(2 * m * k * n for m, k, n in shapes))


def decode_step_flops(config: ModelConfig, batch: int, context: float) -> float:
    """Useful FLOPs of one decoding step (one token per row at `context` cached tokens)."""
    c = config
    dense, head = _matmul_params_per_token(config)
    flops = 2.0 * batch * (dense + head)
    flops += c.layer_types.count("attention") * 4.0 * batch * c.num_attention_heads * c.head_dim * (context + 1)
    flops += c.layer_types.count("mamba") * batch * 4.0 * c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size
    return flops


def distinct_experts(model: NemotronH, variables: dict, sequences: np.ndarray, positions: range) -> list[list[int]]:
    """For each MoE layer of the main stack, the distinct experts the batch's rows are routed to at each
    of `positions`, from one forward over `sequences` [b, t] (the routing decoding saw, up to rounding)."""
    _, state = model.apply(variables, jnp.asarray(sequences), capture_intermediates=lambda m, _: isinstance(m, Router),
                           mutable=["intermediates"])
    found = [leaf for path, leaf in leaf_paths(state["intermediates"])
             if path.startswith("backbone/") and path.endswith("gate/__call__/0/0")]  # the Routers' expert ids
    b, t = sequences.shape
    per_layer = []
    for ids in found:
        ids_btk = np.asarray(ids).reshape(b, t, -1)
        per_layer.append([len(np.unique(ids_btk[:, p])) for p in positions])
    return per_layer


def _best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - begin)
    return best


def measured_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best time of a float32 column sum over `megabytes`."""
    a = jnp.ones((megabytes * 2**20 // 4096, 1024), jnp.float32)
    seconds = _best_seconds(jax.jit(lambda a: jnp.sum(a, axis=0)), a, repeats=repeats)
    return a.size * 4 / seconds


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 [n, n] x [n, n] matmuls."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    return 2 * n**3 / _best_seconds(jax.jit(jnp.dot), a, b, repeats=repeats)
