"""Random small Nemotron-H checkpoints made with the `transformers` reference (test-only helper).

Every parameter and the correction bias is randomised (not the default init), so a wrong layout,
transpose or formula shows up in the logits. torch is imported by the functions that use it, so test
modules can import this one where torch is absent (the tests that call those functions are marked
`torch` and deselected there).
"""

from __future__ import annotations

import math

from transformers import NemotronHConfig

LETTERS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def small_hf_config(pattern: str = "ME*-", **overrides) -> NemotronHConfig:
    """A small config with every feature switched on; transformers clamps dt at time_step_min, so the
    same value is written as time_step_limit for nemojax."""
    dt_min = overrides.pop("time_step_min", 0.05)
    fields = dict(
        vocab_size=97, hidden_size=64, layers_block_type=[LETTERS[c] for c in pattern],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8,
        intermediate_size=96, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=24, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, eos_token_id=2, pad_token_id=0, bos_token_id=1,
        time_step_min=dt_min, time_step_limit=(dt_min, math.inf),
    )
    fields.update(overrides)
    return NemotronHConfig(**fields)


def randomize_(model, seed: int = 0) -> None:
    """Overwrite every parameter and buffer of a torch module with random values of a sensible scale."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            shape = tensor.shape
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                value = torch.rand(shape, generator=gen) * 2.0 - 1.0
            elif leaf == "dt_bias":
                value = torch.rand(shape, generator=gen) * 5.0 - 4.0
            elif leaf == "D":
                value = torch.randn(shape, generator=gen)
            elif leaf == "e_score_correction_bias":
                value = torch.randn(shape, generator=gen) * 0.1
            elif "norm" in name and tensor.ndim == 1:
                value = 1.0 + 0.3 * torch.randn(shape, generator=gen)
            elif leaf == "bias":
                value = 0.1 * torch.randn(shape, generator=gen)
            elif tensor.ndim >= 2:
                value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])  # last axis = fan-in
            else:
                value = torch.randn(shape, generator=gen)
            tensor.copy_(value.to(tensor.dtype))


def make_checkpoint(directory, pattern: str = "ME*-", seed: int = 0, **overrides):
    """Build, randomise and save a reference NemotronHForCausalLM; returns it (float32, eval mode)."""
    import torch
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(small_hf_config(pattern, **overrides)).float().eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    return model


def reference_logits(model, ids, attention_mask=None):
    """The reference model's float32 logits (numpy) for token ids and an optional attention mask."""
    import torch

    ids_t = torch.as_tensor(ids, dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask, use_cache=False).logits.float().numpy()
