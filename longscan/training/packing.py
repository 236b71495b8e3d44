"""Packed documents for training: document boundaries, in-document positions and the loss mask.

The token stream holds documents each ending with EOS (``data.py``), cut into sequences of ``seq_len``
tokens with no regard for documents. With ``data.pack_documents`` every sequence is split after each
EOS into documents; every SP rank reads the whole sequence's tokens to build the same global
``cu_seqlens``, then keeps for its own tokens (layout order):
- the position of each token inside its document (RoPE restarts at 0 in every document);
- a loss mask that drops the target of each EOS: the token after it starts the next document, which the
  previous document cannot predict. (A sequence starts mid-document where packing cut it: that part is a
  document of its own.)

With ``data.balance_documents`` the documents of each sequence are first put in the order that
``balance.balanced_order`` picks for the SP group (a sequence's documents are independent, so their order
changes no result); tokens, labels, positions and the loss mask all follow their document.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longscan.distributed.balance import BalanceSearch, balanced_order, reorder_documents
from longscan.distributed.documents import document_positions
from longscan.distributed.layouts import check_layout
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


@dataclass(frozen=True)
class DocumentBalance:
    """Reorder every sequence's documents to balance causal softmax attention over an SP group of ``world``
    ranks in ``layout`` (the group the sequence is sharded over)."""
    world: int
    layout: str
    search: BalanceSearch = BalanceSearch()

    def __post_init__(self):
        check_layout(self.layout)
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"DocumentBalance.world must be an integer >= 1, got {self.world!r}")


class DocumentPackedData(PackedData):
    """:class:`PackedData` whose microbatches are :class:`DocumentMicrobatch` (same sequences, order and split);
    with ``balance``, each sequence's documents in the balanced order."""

    def __init__(self, data: PackedData, eos: int, balance: DocumentBalance | None = None):
        self.__dict__.update(vars(data))          # the same stream, split, order and local positions
        self.eos = eos
        self.balance = balance

    def rows(self, seq_indices: list[int]) -> DocumentMicrobatch:
        L = self.seq_len
        local = torch.from_numpy(self.pos)
        cus, pos, idx = [], [], []
        for s in seq_indices:
            cu = row_cu_seqlens(self.tokens[s * L:(s + 1) * L], self.eos)
            source = local                        # the row's global position of each local token
            if self.balance is not None:
                b = self.balance
                cu, moved = reorder_documents(cu, balanced_order(cu.diff(), b.world, b.layout, b.search))
                source = moved[local]
            cus.append(cu)
            pos.append(document_positions(cu, L)[local])
            idx.append(s * L + source.numpy())
        idx = np.stack(idx)
        # a token's label is the stream's next token at its place before any reordering: it moves with it
        tokens = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        labels = torch.from_numpy(np.asarray(self.tokens[idx + 1], dtype=np.int64))
        mask = (tokens != self.eos).float()
        return DocumentMicrobatch(tokens, labels, cus, torch.stack(pos), mask)
