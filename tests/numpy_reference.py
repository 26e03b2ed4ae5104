"""Direct numpy implementations of the FACTS.md formulas (test-only; slow and obvious on purpose)."""

import numpy as np


def rmsnorm(x, w, eps=1e-5):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def relu2(x):
    return np.maximum(x, 0.0) ** 2


def causal_gqa(x, p, cfg):
    """Attention with no positional encoding, heads sharing kv heads in groups."""
    t = x.shape[0]
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ p["q_proj"]["kernel"]).reshape(t, h, d)
    k = (x @ p["k_proj"]["kernel"]).reshape(t, kv, d)
    v = (x @ p["v_proj"]["kernel"]).reshape(t, kv, d)
    out = np.zeros((t, h, d))
    for head in range(h):
        g = head // (h // kv)
        s = q[:, head] @ k[:, g].T / np.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
    return out.reshape(t, h * d) @ p["o_proj"]["kernel"]


def latent_moe(x, p, bias, cfg):
    """Per-token loop over the chosen experts, FACTS.md 'MoE forward' steps 1-5."""
    e_count = cfg.n_routed_experts
    out = np.zeros_like(x)
    for i, tok in enumerate(x):
        s = 1.0 / (1.0 + np.exp(-(tok @ p["gate"]["kernel"])))
        choice = s + bias
        if cfg.n_group > 1:
            groups = choice.reshape(cfg.n_group, -1)
            group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
            keep = np.argsort(-group_score)[: cfg.topk_group]
            allowed = np.zeros(cfg.n_group, bool)
            allowed[keep] = True
            choice = np.where(np.repeat(allowed, e_count // cfg.n_group), choice, -np.inf)
        chosen = np.argsort(-choice)[: cfg.num_experts_per_tok]
        w = s[chosen]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.routed_scaling_factor
        z = tok @ p["fc1_latent_proj"]["kernel"] if cfg.moe_latent_size else tok
        routed = sum(wj * (relu2(z @ p["experts"]["up_proj"][e]) @ p["experts"]["down_proj"][e])
                     for wj, e in zip(w, chosen, strict=True))
        if cfg.moe_latent_size:
            routed = routed @ p["fc2_latent_proj"]["kernel"]
        shared = relu2(tok @ p["shared_experts"]["up_proj"]["kernel"]) @ p["shared_experts"]["down_proj"]["kernel"]
        out[i] = routed + shared
    return out
