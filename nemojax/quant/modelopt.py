"""ModelOpt quantization configs: which published module is stored in which format.

A ModelOpt checkpoint describes its quantization in `hf_quant_config.json`
(`{"producer": ..., "quantization": {...}}`) and/or in config.json's `quantization_config`
(the same fields plus `"quant_method": "modelopt"`; newer exporters write `ignore` for
`exclude_modules` and a `kv_cache_scheme` dict). The fields read here:

- `quant_algo`: `NVFP4` or `FP8` (every quantizable linear not excluded), or `MIXED_PRECISION`
  with `quantized_layers` {module: {"quant_algo": ..., "group_size": 16}};
- `group_size` (NVFP4: must be 16), `exclude_modules` (names or fnmatch wildcards),
  `kv_cache_quant_algo` (`FP8` or none).

`parse_scheme` turns that into a `QuantScheme` over the model's own module names, collecting every
problem into one CheckpointError; `scheme_to_config` writes a scheme back in the same form.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from nemojax.errors import CheckpointError

FORMATS = ("nvfp4", "fp8")
_ALGOS = {"NVFP4": "nvfp4", "FP8": "fp8"}
_KV_ALGOS = {"FP8": "fp8"}
NVFP4_GROUP_SIZE = 16
QUANT_CONFIG_FILE = "hf_quant_config.json"


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """Formats of the quantized modules (published module name -> "nvfp4" | "fp8"; absent = the
    checkpoint's float dtype) and the KV-cache format (None or "fp8")."""

    formats: Mapping[str, str]
    kv_cache: str | None = None

    def format_of(self, module: str) -> str | None:
        return self.formats.get(module)

    @property
    def quantized(self) -> bool:
        return bool(self.formats) or self.kv_cache is not None


def read_quant_config(directory: str) -> tuple[dict[str, Any] | None, str]:
    """The quantization block of a checkpoint directory and where it came from; (None, "") if none.

    When both hf_quant_config.json and config.json's quantization_config are present they must agree
    on quant_algo.
    """
    found: list[tuple[dict, str]] = []
    path = os.path.join(directory, QUANT_CONFIG_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not readable JSON ({e})") from e
        block = data.get("quantization") if isinstance(data, dict) else None
        if not isinstance(block, dict):
            raise CheckpointError(f"{path}: expected an object with a \"quantization\" object")
        found.append((block, path))
    with open(os.path.join(directory, "config.json")) as f:
        qc = json.load(f).get("quantization_config")
    if qc is not None:
        where = os.path.join(directory, "config.json") + ": quantization_config"
        method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
        if method != "modelopt":
            raise CheckpointError(f"{where}: quant_method {method or None!r} is not supported "
                                  "(only ModelOpt checkpoints, quant_method \"modelopt\")")
        found.append((qc.get("quantization", qc), where))
    if not found:
        return None, ""
    algos = {str(block.get("quant_algo", "")).upper() for block, _ in found}
    if len(algos) > 1:
        raise CheckpointError(f"{' and '.join(w for _, w in found)} disagree on quant_algo ({sorted(algos)})")
    return found[0]


def _excluded(module: str, patterns: list[str]) -> bool:
    """ModelOpt's exclusion: a module named (or one of its submodules), or a wildcard match; `path*`
    means the subtree at `path` (so `layers.1*` does not reach `layers.10`)."""
    for pattern in patterns:
        subtree = len(pattern) >= 2 and pattern.endswith("*") and pattern[-2] != "."
        for p in ([pattern[:-1], pattern[:-1] + ".*"] if subtree else [pattern]):
            if module.startswith(p + ".") or fnmatch.fnmatchcase(module, p):
                return True
    return False


def _kv_format(block: Mapping[str, Any], problems: list[str]) -> str | None:
    algo = block.get("kv_cache_quant_algo")
    scheme = block.get("kv_cache_scheme")
    if algo is None and isinstance(scheme, dict):
        algo = "FP8" if (scheme.get("type"), scheme.get("num_bits")) == ("float", 8) else repr(scheme)
    if algo is None:
        return None
    if str(algo).upper() not in _KV_ALGOS:
        problems.append(f"kv_cache_quant_algo {algo!r}: expected one of {sorted(_KV_ALGOS)} or none")
        return None
    return _KV_ALGOS[str(algo).upper()]


def _layer_format(entry: Any, where: str, problems: list[str]) -> str | None:
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: expected an object with quant_algo, got {entry!r}")
        return None
    algo = str(entry.get("quant_algo", "")).upper()
    if algo not in _ALGOS:
        problems.append(f"{where}: unknown quant_algo {entry.get('quant_algo')!r} (expected one of {sorted(_ALGOS)})")
        return None
    group = entry.get("group_size", NVFP4_GROUP_SIZE if algo == "NVFP4" else None)
    if algo == "NVFP4" and group != NVFP4_GROUP_SIZE:
        problems.append(f"{where}: NVFP4 group_size {group!r}, only {NVFP4_GROUP_SIZE} is supported")
        return None
    return _ALGOS[algo]


def parse_scheme(block: Mapping[str, Any], modules: Iterable[str], source: str) -> QuantScheme:
    """The scheme a quantization block gives the model's quantizable `modules` (published names).

    Unknown algorithms, group sizes other than 16, quantized_layers naming modules the model does
    not have (or cannot quantize) and exclusions that contradict them: one CheckpointError naming all.
    """
    modules = list(modules)
    known = set(modules)
    problems: list[str] = []
    algo = str(block.get("quant_algo", "")).upper()
    exclude = block.get("exclude_modules", block.get("ignore", [])) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        problems.append(f"exclude_modules: expected a list of names, got {exclude!r}")
        exclude = []
    kv_cache = _kv_format(block, problems)
    formats: dict[str, str] = {}
    if algo == "MIXED_PRECISION":
        layers = block.get("quantized_layers")
        if not isinstance(layers, Mapping):
            problems.append("quant_algo MIXED_PRECISION needs a quantized_layers object")
            layers = {}
        for name, entry in layers.items():
            fmt = _layer_format(entry, f"quantized_layers[{name!r}]", problems)
            if name not in known:
                problems.append(f"quantized_layers[{name!r}]: not a quantizable module of this model")
            elif _excluded(name, exclude):
                problems.append(f"quantized_layers[{name!r}]: also matched by exclude_modules")
            elif fmt is not None:
                formats[name] = fmt
    elif algo in _ALGOS:
        fmt = _layer_format(block, "quant_algo", problems)
        if fmt is not None:
            formats = {m: fmt for m in modules if not _excluded(m, exclude)}
    else:
        problems.append(f"unknown quant_algo {block.get('quant_algo')!r} "
                        f"(expected one of {sorted(_ALGOS) + ['MIXED_PRECISION']})")
    if problems:
        raise CheckpointError(f"{source}: unsupported quantization config:\n  " + "\n  ".join(problems))
    return QuantScheme(dict(sorted(formats.items())), kv_cache)


def scheme_to_config(scheme: QuantScheme, modules: Iterable[str]) -> dict[str, Any]:
    """The `quantization` block (MIXED_PRECISION with every quantized module listed, the others
    excluded) that `parse_scheme` reads back as `scheme`."""
    entries = {name: ({"quant_algo": "NVFP4", "group_size": NVFP4_GROUP_SIZE} if fmt == "nvfp4"
                      else {"quant_algo": "FP8"}) for name, fmt in scheme.formats.items()}
    block: dict[str, Any] = {
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": None if scheme.kv_cache is None else scheme.kv_cache.upper(),
        "quantized_layers": entries,
        "exclude_modules": sorted(m for m in modules if m not in scheme.formats),
    }
    return block


def write_quant_config(directory: str, block: Mapping[str, Any], producer: str) -> None:
    """hf_quant_config.json in ModelOpt's shape."""
    with open(os.path.join(directory, QUANT_CONFIG_FILE), "w") as f:
        json.dump({"producer": {"name": producer}, "quantization": dict(block)}, f, indent=2)
