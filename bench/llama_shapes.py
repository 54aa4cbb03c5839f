"""The GaLore paper's Llama shapes (Zhao et al. 2024, Table 5 / their configs), shared by the
benchmarks. Tensors are built directly (no HF model init) so 350M/1B shapes are quick to make."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000
    galore_rank: int = 128  # the rank the paper uses for this size


SHAPES = {
    "60m": LlamaShape("60m", 512, 1376, 8, 8, galore_rank=128),
    "130m": LlamaShape("130m", 768, 2048, 12, 12, galore_rank=256),
    "350m": LlamaShape("350m", 1024, 2736, 24, 16, galore_rank=256),
    "1b": LlamaShape("1b", 2048, 5461, 24, 32, galore_rank=512),
    "7b": LlamaShape("7b", 4096, 11008, 32, 32, galore_rank=1024),
}


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape, device=None):
        super().__init__()
        h, i = s.hidden, s.intermediate
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(h, h, bias=False, device=device))
        self.gate_proj = nn.Linear(h, i, bias=False, device=device)
        self.up_proj = nn.Linear(h, i, bias=False, device=device)
        self.down_proj = nn.Linear(i, h, bias=False, device=device)
        self.input_layernorm = nn.Parameter(torch.ones(h, device=device))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h, device=device))


class LlamaParams(nn.Module):
    """Parameters of a Llama of shape ``s`` with ``layers`` decoder layers (no forward)."""

    def __init__(self, s: LlamaShape, layers: int | None = None, with_embeddings: bool = True,
                 materialize: bool = True):
        super().__init__()
        if with_embeddings:
            self.embed_tokens = nn.Embedding(s.vocab, s.hidden, device="meta")
            self.norm = nn.Parameter(torch.ones(s.hidden, device="meta"))
            self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(s, device="meta") for _ in range(s.layers if layers is None else layers))
        if materialize:  # else left on the meta device (e.g. to be sharded first, then materialised)
            self.materialize()

    def materialize(self) -> None:
        self.to_empty(device="cpu")
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.02)


def parameter_count(s: LlamaShape) -> int:
    h, i = s.hidden, s.intermediate
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return s.layers * per_layer + 2 * s.vocab * h + h
