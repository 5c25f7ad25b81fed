"""Which parameter gets which optimizer, and which logical matrices a fused weight holds.

OSP's rule ("decoupled embedding optimisation"): Muon for every 2-D hidden matrix and for the two
EmbProj matrices; AdamW for the token embedding and output matrices, norm gains and biases.
The paper's "Muon-only" ablation ("muon_only") has no AdamW at all: every matrix, embedding and
output layer included, gets Muon, and vectors/scalars get Muon's normalised update (u / ||u||).
The split of fused weights is decided from the model config (heads, query groups, head size),
never from a tensor's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ADAMW_MATRICES = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class Route:
    muon: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    adamw_decay: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    adamw_no_decay: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)

    def table(self) -> str:
        rows = [("parameter", "shape", "optimizer")]
        for label, items in (
            ("muon", [(n, p) for n, p in self.muon if p.ndim == 2]),
            ("muon (normalized vector)", [(n, p) for n, p in self.muon if p.ndim != 2]),
            ("adamw", self.adamw_decay),
            ("adamw (no wd)", self.adamw_no_decay),
        ):
            rows += [(n, "x".join(map(str, p.shape)), label) for n, p in items]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def route_parameters(model_chunks, optimizer: str) -> Route:
    """Split trainable parameters by optimizer. ``optimizer`` is "adam", "muon" or "muon_only"."""
    if optimizer not in ("adam", "muon", "muon_only"):
        raise ValueError(f"optimizer must be 'adam', 'muon' or 'muon_only', got {optimizer!r}")
    route = Route()
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.ndim == 2 and not any(name.endswith(n) for n in ADAMW_MATRICES)
            if optimizer == "muon_only" or (optimizer == "muon" and is_matrix):
                route.muon.append((name, p))
            elif p.ndim >= 2:
                route.adamw_decay.append((name, p))
            else:
                route.adamw_no_decay.append((name, p))
    return route


def logical_blocks(name: str, config, qkv_split: str = "qkv"):
    """Row index sets of the logical matrices inside a (TP=1) Megatron weight, or None if whole.

    linear_qkv rows are laid out per query group g as [q heads of g | k of g | v of g].
    ``qkv_split``: "qkv" = three matrices Q, K, V (as in the paper's unfused model);
    "per_head" = one matrix per query head and per K/V head; "none" = the fused matrix.
    linear_fc1 of a gated MLP is [gate; up].
    """
    if name.endswith("self_attention.linear_qkv.weight") and qkv_split != "none":
        return _qkv_blocks(config, qkv_split)
    if name.endswith("mlp.linear_fc1.weight") and config.gated_linear_unit:
        f = config.ffn_hidden_size
        return [torch.arange(0, f), torch.arange(f, 2 * f)]
    return None


def _qkv_blocks(config, qkv_split: str):
    hn = config.kv_channels
    groups = config.num_query_groups or config.num_attention_heads
    q_per_group = config.num_attention_heads // groups
    per_group = (q_per_group + 2) * hn
    q_heads, k_heads, v_heads = [], [], []
    for g in range(groups):
        base = g * per_group
        for h in range(q_per_group):
            q_heads.append(torch.arange(base + h * hn, base + (h + 1) * hn))
        k_heads.append(torch.arange(base + q_per_group * hn, base + (q_per_group + 1) * hn))
        v_heads.append(torch.arange(base + (q_per_group + 1) * hn, base + per_group))
    if qkv_split == "per_head":
        return q_heads + k_heads + v_heads
    if qkv_split == "qkv":
        return [torch.cat(q_heads), torch.cat(k_heads), torch.cat(v_heads)]
    raise ValueError(f"optimizer.muon_qkv_split must be 'qkv', 'per_head' or 'none', got {qkv_split!r}")
