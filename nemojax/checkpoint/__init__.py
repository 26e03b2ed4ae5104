"""Checkpoints: the published Hugging Face safetensors layout (hf.py) and raw safetensors I/O."""
