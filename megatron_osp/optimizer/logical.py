"""Where each logical matrix of a Muon parameter lives on the tensor-parallel ranks.

Muon must orthogonalise the *logical* matrices (Q, K, V; gate and up; every other hidden matrix;
the EmbProj matrices) whatever the TP layout. A ``LogicalBlock`` is one such matrix: its logical
shape and, for every TP rank, the ``Piece`` of it that rank's shard holds (which local rows, which
block rows, which block columns). The block split comes from the model config
(``routing.logical_blocks``), and the TP slicing from ``models/layout.split_for_rank`` applied to
row/column *index* tensors, so the optimizer and the checkpoint converter share one definition of
the layout and nothing is inferred from a local shard's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_osp.models.layout import layer_offset, partition_dim, split_for_rank, to_global_name, unwrap
from megatron_osp.optimizer.routing import logical_blocks


@dataclass(frozen=True)
class Piece:
    """One TP rank's part of a logical block: local rows -> block rows, over block columns ``cols``."""

    local_rows: torch.Tensor  # int64 rows of the local shard
    block_rows: torch.Tensor  # int64 rows of the logical block, same length
    cols: tuple[int, int]  # [start, stop) columns of the logical block held by this rank

    @property
    def numel(self) -> int:
        return len(self.local_rows) * (self.cols[1] - self.cols[0])


@dataclass
class LogicalBlock:
    key: str  # global parameter name, plus "[i]" for the i-th block of a fused weight
    param_index: int  # position of the parameter in the optimizer's flat parameter list
    shape: tuple[int, int]  # logical (m, n)
    pieces: list[Piece]  # one per TP rank; identical full pieces if the parameter is replicated
    sharded: bool  # whether the parameter is split over TP (else every TP rank holds all of it)
    owner: int = -1  # rank in the TP x DP domain that runs Newton-Schulz on it


def row_selector(rows: torch.Tensor, device: torch.device | str | None = None):
    """Index for ``rows``: a slice where they are a contiguous run (reads and writes are then views),
    else the index tensor, moved to ``device`` when one is given (a CPU index on a CUDA tensor costs
    a blocking host-to-device copy, which waits for the stream, at every gather)."""
    n = len(rows)
    if n == 0:
        return slice(0, 0)
    first = int(rows[0])
    if int(rows[-1]) - first == n - 1 and (n < 3 or bool(torch.all(rows[1:] - rows[:-1] == 1))):
        return slice(first, first + n)
    return rows if device is None else rows.to(device)


VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def vocab_rows(name: str, model) -> torch.Tensor | None:
    """For the embedding and output layer (Muon-routed only in muon_only), the rows of the
    tokenizer's vocabulary: their logical matrix. The rows past it pad the vocabulary to a multiple
    of make_vocab_size_divisible_by x TP; they are not tokens (the loss masks them, so their gradient
    is zero) and must not enter the matrix, whose shape sets Muon's update scale: with them the
    update depended on the padding setting and the TP size. Being in no block, the padding rows
    get no update and no weight decay. None for other parameters (and models with no vocabulary
    size set)."""
    if not name.endswith(VOCAB_PARAMS):
        return None
    vocab = getattr(unwrap(model), "unpadded_vocab_size", None)
    return None if vocab is None else torch.arange(vocab)


def _qkv_rows(config) -> int:
    groups = config.num_query_groups or config.num_attention_heads
    return (config.num_attention_heads + 2 * groups) * config.kv_channels


def check_tp_layout(name: str, param, config, tp_size: int):
    """Fail at start-up, naming the parameter, when the config and the shard cannot agree."""
    groups = config.num_query_groups or config.num_attention_heads
    if name.endswith("self_attention.linear_qkv.weight"):
        if groups % tp_size:
            raise ValueError(
                f"Muon: parameter {name!r}: tensor_parallel_size={tp_size} must divide the "
                f"num_query_groups={groups} of the model (TP cannot split a query group)"
            )
        expected = _qkv_rows(config)
        if param.shape[0] * tp_size != expected:
            raise ValueError(
                f"Muon: parameter {name!r} has {param.shape[0]} rows on each of {tp_size} TP ranks, "
                f"but the model config (heads={config.num_attention_heads}, query groups={groups}, "
                f"kv_channels={config.kv_channels}) lays out {expected} QKV rows"
            )
    if name.endswith("mlp.linear_fc1.weight") and config.gated_linear_unit:
        expected = 2 * config.ffn_hidden_size
        if param.shape[0] * tp_size != expected:
            raise ValueError(
                f"Muon: parameter {name!r} has {param.shape[0]} rows on each of {tp_size} TP ranks, "
                f"but gate + up of ffn_hidden_size={config.ffn_hidden_size} are {expected} rows"
            )


def build_blocks(
    named_params, model, param_offset: int, tp_size: int, qkv_split: str = "qkv", offset: int | None = None
) -> list[LogicalBlock]:
    """Logical blocks of one model chunk's Muon parameters (2-D, as routed) at this TP size.

    ``named_params`` are (local name, parameter) pairs of ``model``; ``param_offset`` is the
    position of the first of them in the optimizer's flat parameter list; ``offset`` is the
    chunk's first layer number (default: from the model and the parallel state).
    """
    config = model.config
    if offset is None:
        offset = layer_offset(model)
    blocks: list[LogicalBlock] = []
    for i, (name, param) in enumerate(named_params):
        if param.ndim != 2:
            raise ValueError(
                f"Muon: parameter {name!r} has shape {tuple(param.shape)}; Newton-Schulz needs a "
                f"2-D matrix (route it to AdamW, or use the muon_only ablation for vectors)"
            )
        check_tp_layout(name, param, config, tp_size)
        dim = partition_dim(param)
        sharded = dim is not None and tp_size > 1
        rows, cols = param.shape
        if sharded and dim == 0:
            rows *= tp_size
        elif sharded and dim == 1:
            cols *= tp_size
        elif sharded:
            raise ValueError(f"Muon: parameter {name!r} is split over TP along dim {dim}; only 0 or 1 exist")
        vocab = vocab_rows(name, model)
        if vocab is not None and len(vocab) > rows:
            raise ValueError(f"Muon: parameter {name!r} has {rows} rows, fewer than the vocabulary's {len(vocab)}")
        row_sets = logical_blocks(name, config, qkv_split) or [vocab if vocab is not None else torch.arange(rows)]
        local_ids, col_ranges = [], []
        for t in range(tp_size if sharded else 1):
            r_ids = torch.arange(rows).unsqueeze(1)
            c_ids = torch.arange(cols).unsqueeze(0)
            if sharded and dim == 0:
                r_ids = split_for_rank(r_ids, param, name, model, t, tp_size)
            if sharded and dim == 1:
                c_ids = split_for_rank(c_ids, param, name, model, t, tp_size)
            c = c_ids[0]
            if not torch.equal(c, torch.arange(int(c[0]), int(c[0]) + len(c))):
                raise ValueError(f"Muon: parameter {name!r}: a TP shard's columns are not contiguous")
            local_ids.append(r_ids[:, 0])
            col_ranges.append((int(c[0]), int(c[0]) + len(c)))
        gname = to_global_name(name, offset)
        for b, idx in enumerate(row_sets):
            position = torch.full((rows,), -1, dtype=torch.long)
            position[idx] = torch.arange(len(idx))
            pieces = []
            for ids, cr in zip(local_ids, col_ranges):
                br = position[ids]
                keep = torch.nonzero(br >= 0).flatten()
                pieces.append(Piece(local_rows=keep, block_rows=br[keep], cols=cr))
            if not sharded:
                pieces = pieces * tp_size
            key = gname if len(row_sets) == 1 else f"{gname}[{b}]"
            blocks.append(LogicalBlock(key, param_offset + i, (len(idx), cols), pieces, sharded))
    return blocks

