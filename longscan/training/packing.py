"""Packed documents for training: document boundaries, in-document positions and the loss mask.

The token stream holds documents each ending with EOS (``data.py``), cut into sequences of ``seq_len``
tokens with no regard for documents. With ``data.pack_documents`` every sequence is split after each
EOS into documents; every SP rank reads the whole sequence's tokens to build the same global
``cu_seqlens``, then keeps for its own tokens (layout order):
- the position of each token inside its document (RoPE restarts at 0 in every document);
- a loss mask that drops the target of each EOS: the token after it starts the next document, which the
  previous document cannot predict. (A sequence starts mid-document where packing cut it: that part is a
  document of its own.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longscan.distributed.documents import document_positions
from longscan.training.data import Microbatch, PackedData


@dataclass
class DocumentMicrobatch(Microbatch):
    """A :class:`Microbatch` of packed documents: per row its documents, and per local token its
    in-document position and whether its label is a target."""
    cu_seqlens: list            # per row: int64 [N + 1] offsets into the global sequence (CPU)
    positions: torch.Tensor     # [B, T_local] int64: position inside its document
    loss_mask: torch.Tensor     # [B, T_local] float32: 0 where the token is EOS (its label starts a new document)


def row_cu_seqlens(row: np.ndarray, eos: int) -> torch.Tensor:
    """Document offsets of one global sequence: a document ends after each EOS -> int64 `[N + 1]`."""
    n = len(row)
    ends = np.flatnonzero(np.asarray(row) == eos) + 1
    return torch.from_numpy(np.concatenate([[0], ends[ends < n], [n]]).astype(np.int64))


class DocumentPackedData(PackedData):
    """:class:`PackedData` whose microbatches are :class:`DocumentMicrobatch` (same order and split)."""

    def __init__(self, data: PackedData, eos: int):
        self.__dict__.update(vars(data))          # the same stream, split, order and local positions
        self.eos = eos

    def rows(self, seq_indices: list[int]) -> DocumentMicrobatch:
        mb = super().rows(seq_indices)
        L = self.seq_len
        cus, pos = [], []
        for s in seq_indices:
            cu = row_cu_seqlens(self.tokens[s * L:(s + 1) * L], self.eos)
            cus.append(cu)
            pos.append(document_positions(cu, L)[torch.from_numpy(self.pos)])
        mask = (mb.tokens != self.eos).float()
        return DocumentMicrobatch(mb.tokens, mb.labels, cus, torch.stack(pos), mask)
