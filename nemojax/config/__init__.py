"""Model configuration: the ModelConfig dataclass (`model_config`), the published config.json naming
(`hf`), and config files (`files`)."""

from nemojax.config.files import load_config_file, packaged_config_names, resolve_model_config
from nemojax.config.hf import (
    from_hf_config,
    parse_block_types,
    parse_pattern,
    read_hf_config,
    storage_dtype,
    to_hf_dict,
)
from nemojax.config.model_config import (
    FLOAT_DTYPES,
    INT32_MAX,
    KERNEL_CHOICES,
    KV_CACHE_DTYPES,
    LAYER_KINDS,
    NEMOJAX_FIELDS,
    PATTERN_LETTERS,
    ModelConfig,
    dtype_name,
    from_dict,
)

__all__ = ["FLOAT_DTYPES", "INT32_MAX", "KERNEL_CHOICES", "KV_CACHE_DTYPES", "LAYER_KINDS", "NEMOJAX_FIELDS",
           "PATTERN_LETTERS", "ModelConfig",
           "dtype_name", "from_dict", "from_hf_config", "load_config_file", "packaged_config_names",
           "parse_block_types", "parse_pattern", "read_hf_config", "resolve_model_config", "storage_dtype",
           "to_hf_dict"]
