"""On-policy post-training: MOPD (multi-teacher on-policy distillation) and GRPO with verifiable rewards.

Both share one loop (`loop.py`): each step a deterministic batch of prompts (`prompts.py`), rollouts
sampled from the current student by the serving engine (`rollouts.py`), scoring (teachers per domain,
or rewards per environment with a frozen reference model), one optimizer update (`objectives.py`),
metrics and Orbax checkpoints. `settings.py` holds the run config's `posttrain` block.
"""
