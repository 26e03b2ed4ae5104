"""SFT end to end from a Hugging Face directory (`--init-from`), as the published models would be
fine-tuned: the `sft_tiny` recipe on packed chats loads the checkpoint's weights and config, trains
with document masking and saves a checkpoint of the same architecture."""

import json
import os

import jax
import numpy as np

from nemojax.checkpoint.hf import save_pretrained
from nemojax.checkpoint.orbax import latest_step, load_model
from nemojax.config import from_hf_config, to_hf_dict
from nemojax.model import init_variables
from nemojax.train.data import TokenBatches
from nemojax.train.loop import train
from nemojax.train.metrics import read_metrics
from nemojax.train.run_config import load_run_config
from nemojax.train.tokenizer import load_tokenizer

# A published config.json's fields at tiny widths (every layer kind and the MTP block).
HF_CONFIG = dict(vocab_size=512, hidden_size=64, hybrid_override_pattern="M*E", num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                 n_groups=1, chunk_size=32, intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, moe_latent_size=32,
                 mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("apple", "river", "stone", "cloud", "ember", "maple", "north", "quiet")


def test_sft_recipe_fine_tunes_a_hugging_face_checkpoint(tmp_path):
    config = from_hf_config(HF_CONFIG)
    source = init_variables(config, jax.random.key(3))
    save_pretrained(tmp_path / "hf", config, source)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Join {a} and {b}."}, {"role": "assistant", "content": f"{a}-{b}"}]}) + "\n"
        for a in WORDS for b in WORDS))
    cfg = load_run_config(os.path.join(REPO, "configs", "sft_tiny.py"), [
        f"--config.data.paths={chats}", "--config.data.vocab_size=300", "--config.num_steps=1",
        "--config.batch_size=2", "--config.seq_len=64", "--config.eval_batches=1", "--config.mesh.fsdp=1"])
    workdir = str(tmp_path / "sft")
    train(cfg, workdir, init_from=str(tmp_path / "hf"))

    # Packed chats: several documents per row, each kept apart by the ids the step receives.
    batch = next(TokenBatches(cfg.data, load_tokenizer(workdir), batch_size=2, seq_len=64, seed=cfg.seed))
    assert all(len(np.unique(row)) > 2 for row in batch["segments"])
    record = read_metrics(os.path.join(workdir, "metrics.jsonl"))[-1]
    assert record["step"] == 1 and np.isfinite(record["loss"]) and np.isfinite(record["eval_loss"])
    assert latest_step(os.path.join(workdir, "checkpoints")) == 1
    model, saved = load_model(workdir)
    assert to_hf_dict(model.config) == to_hf_dict(config)  # the published architecture, kept
    # Started from the checkpoint's weights (a fresh init would be far away) and took one small step.
    moved = [float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
             for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(source["params"]), strict=True)]
    assert 0 < max(moved) < 1e-3
