"""nemojax: Nemotron 3 (Nano, Super, Ultra) in JAX/Flax."""

from nemojax.checkpoint.hf import load_pretrained
from nemojax.config import ModelConfig, from_hf_config
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.sharding import make_mesh, use_mesh

__all__ = ["ModelConfig", "from_hf_config", "NemotronH", "init_cache", "init_variables", "load_pretrained",
           "make_mesh", "use_mesh"]
