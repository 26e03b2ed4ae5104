"""One published tensor's place in the nemojax variables, and the block transforms between the two layouts.

A `Placement` says which leaf holds a published tensor and how (transposed, stacked over experts or
layers, rows reordered). `leaf_reader` builds any block of a leaf from the published tensors (reading
only the slices it needs: loading, conversion to Orbax); `published_block` builds any rows of a
published tensor from a function that reads blocks of its leaf (saving, conversion back). Both are the
one implementation of the layout: loading, saving and conversion all go through them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

Path = tuple[str, ...]
Index = tuple[Any, ...]  # ints, slices and at most one integer array, as numpy indexes
_TILE = 256


def transposed(matrix: Any, out: np.ndarray | None = None) -> np.ndarray:
    """`matrix.T` as a C-contiguous copy (into `out` if given), made tile by tile: about twice as fast as
    numpy's strided copy for the large bf16 matrices conversion moves (and the same for small ones)."""
    matrix = np.asarray(matrix)
    out = np.empty(matrix.shape[::-1], matrix.dtype) if out is None else out
    for i in range(0, matrix.shape[0], _TILE):
        for j in range(0, matrix.shape[1], _TILE):
            out[j:j + _TILE, i:i + _TILE] = matrix[i:i + _TILE, j:j + _TILE].T
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one published tensor goes: collection + path of the leaf, layout, expert index."""

    collection: str
    path: Path
    layout: str  # "same" | "transpose" | "conv" | "expert" (stacked, transposed) | "expert_same" (stacked)
    expert: int = -1
    layer: int = -1  # row of a leaf stacked over layers (scanned layers); -1: not stacked
    # order[j] = the published index (output row / channel) stored at nemojax index j; None = as published.
    order: np.ndarray | None = dataclasses.field(default=None, compare=False)
    # The ModelOpt format ("nvfp4" | "fp8") of the module a quantized weight or scale belongs to; such
    # tensors are stored and held in their own dtype, never cast. None: a float tensor.
    fmt: str | None = None
    # Other names exporters give the same tensor (read if the main name is absent; saved under the main name).
    aliases: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.fmt is not None


class TensorFiles(Protocol):
    """What the leaf reader needs of a set of published tensors (a SafetensorsDir or a view of one)."""

    def read(self, key: str) -> Any: ...


def published_shape(placement: Placement, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the published tensor that `placement` puts into a leaf of shape `leaf_shape`."""
    if placement.layer >= 0:
        leaf_shape = leaf_shape[1:]
    if placement.layout == "transpose":
        return leaf_shape[::-1]
    if placement.layout == "conv":
        return (leaf_shape[1], 1, leaf_shape[0])
    if placement.layout == "expert":
        return leaf_shape[1:][::-1]
    if placement.layout == "expert_same":
        return leaf_shape[1:]
    return leaf_shape


def row_axis(placement: Placement, leaf_ndim: int) -> int | None:
    """The leaf axis that holds the published tensor's first (row) axis; None for scalars."""
    lead = (placement.layer >= 0) + (placement.layout in ("expert", "expert_same"))
    if leaf_ndim == lead:
        return None
    return leaf_ndim - 1 if placement.layout in ("transpose", "conv", "expert") else lead


def leaf_reader(files: TensorFiles, sources: Sequence[tuple[str, Placement]],
                leaf_shape: tuple[int, ...]) -> Callable[[tuple], np.ndarray]:
    """A function index -> numpy block of the leaf (shape `leaf_shape`; index a tuple of slices, one per
    axis), reading only the needed part of the files (`sources`: (stored name, placement) of every
    published tensor of the leaf)."""
    if sources[0][1].layer >= 0:  # stacked over layers: the first index picks the layers
        by_layer: dict[int, list[tuple[str, Placement]]] = {}
        for name, p in sources:
            by_layer.setdefault(p.layer, []).append((name, p))
        readers = [_layer_reader(files, by_layer[layer], leaf_shape[1:]) for layer in range(len(by_layer))]
        return lambda index: _stacked([lambda i=layer: readers[i](index[1:])
                                       for layer in range(len(readers))[index[0]]])
    return _layer_reader(files, sources, leaf_shape)


def _layer_reader(files: TensorFiles, sources: Sequence[tuple[str, Placement]],
                  leaf_shape: tuple[int, ...]) -> Callable[[tuple], np.ndarray]:
    layout = sources[0][1].layout
    if layout in ("expert", "expert_same"):
        by_expert = {p.expert: name for name, p in sources}
        if layout == "expert":
            return lambda index: _stacked([lambda e=e: files.read(by_expert[e])[index[2], index[1]]
                                           for e in range(len(by_expert))[index[0]]], transpose=True)
        return lambda index: np.stack([np.asarray(files.read(by_expert[e]).reshape(leaf_shape[1:])[index[1:]])
                                       for e in range(len(by_expert))[index[0]]])
    name, order = sources[0][0], sources[0][1].order
    # The published rows (output dim / channels) that a slice of the nemojax dim reads.
    rows = (lambda s: s) if order is None else (lambda s: order[s])
    if layout == "transpose":
        return lambda index: transposed(files.read(name)[rows(index[1]), index[0]])
    if layout == "conv":
        return lambda index: np.asarray(files.read(name)[rows(index[1]), 0, index[0]]).T
    if order is not None:  # the conv bias, NVFP4 weights and block scales: published rows reordered
        return lambda index: np.asarray(files.read(name)[(rows(index[0]),) + tuple(index[1:])])
    return lambda index: np.asarray(files.read(name).reshape(leaf_shape)[index])


def _stacked(parts: Sequence[Callable[[], Any]], transpose: bool = False) -> np.ndarray:
    """The blocks `parts()` stacked on a new leading axis (transposed if asked), each copied once into the
    result (np.stack would copy every block twice)."""
    out = None
    for k, part in enumerate(parts):
        block = np.asarray(part())
        if out is None:
            out = np.empty((len(parts),) + (block.shape[::-1] if transpose else block.shape), block.dtype)
        if transpose:
            transposed(block, out[k])
        else:
            out[k] = block
    return out


def published_block(placement: Placement, read_leaf: Callable[[Index], np.ndarray], leaf_shape: tuple[int, ...],
                    rows: slice = slice(None)) -> np.ndarray:
    """Rows `rows` of the published tensor `placement` describes (all of a scalar), from `read_leaf`
    (index -> numpy block of its leaf; an index holds ints, slices and at most one integer array)."""
    prefix: Index = ()
    if placement.layer >= 0:
        prefix += (placement.layer,)
    if placement.layout in ("expert", "expert_same"):
        prefix += (placement.expert,)
    inner = len(leaf_shape) - len(prefix)
    axis = row_axis(placement, len(leaf_shape))
    if axis is None:
        return np.asarray(read_leaf(prefix)).reshape(())
    n = published_shape(placement, leaf_shape)[0]
    start, stop, _ = rows.indices(n)
    # The nemojax indices of published rows start:stop (published row r sits at argsort(order)[r]).
    select = slice(start, stop) if placement.order is None else np.argsort(placement.order)[start:stop]
    index = [slice(None)] * inner
    index[axis - len(prefix)] = select
    block = np.asarray(read_leaf(prefix + tuple(index)))
    if placement.layout in ("transpose", "expert"):
        return transposed(block)
    if placement.layout == "conv":
        return block.T[:, None, :]
    return block
