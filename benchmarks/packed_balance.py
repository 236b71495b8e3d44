"""How evenly causal softmax attention's work spreads over an SP group when documents are packed (no GPU).

    python benchmarks/packed_balance.py [--total 1048576] [--worlds 4 8 16 32] [--doc-lens 2048 16384 131072]

For each document-length distribution (lengths drawn uniformly in [mean/2, 3·mean/2], as in
packed_softmax.py; "one" is a single unpacked document), SP size and layout, prints the busiest rank's
(query, key) pairs over the mean rank's (1.00 = balanced): the factor by which the slowest rank's softmax
attention outlasts a balanced split. "balanced" rows put the same draws' documents in the order
``balance.balanced_order`` picks (``data.balance_documents``). Medians over --seeds draws. A count of pairs,
not a timing. Linear layers cost per token and are balanced by either layout.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.packed_softmax import doc_lengths
from longscan.distributed.balance import balanced_order
from longscan.distributed.documents import causal_pairs_per_rank


def imbalance(lengths: list[int], world: int, layout: str, balance: bool = False) -> float:
    if balance:
        lengths = [lengths[i] for i in balanced_order(torch.tensor(lengths), world, layout).tolist()]
    cu = torch.tensor([0] + lengths).cumsum(0)
    pairs = causal_pairs_per_rank(cu, sum(lengths), world, layout)
    return max(pairs) / (sum(pairs) / world)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total", type=int, default=1 << 20)
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--doc-lens", type=int, nargs="+", default=[2048, 16384, 131072])
    p.add_argument("--seeds", type=int, default=5)
    a = p.parse_args(argv)
    print(f"# busiest rank's causal pairs / mean, {a.total:,} tokens, median of {a.seeds} draws")
    print("| documents | layout | " + " | ".join(f"W={w}" for w in a.worlds) + " |")
    print("|---|---|" + "---|" * len(a.worlds))
    for mean in [None] + a.doc_lens:
        draws = [[a.total]] if mean is None else [doc_lengths(a.total, mean, s) for s in range(a.seeds)]
        for layout, balance in (("contiguous", False), ("contiguous", True), ("zigzag", False), ("zigzag", True)):
            if mean is None and balance:
                continue                                   # one document: no order to choose
            cells = [statistics.median(imbalance(d, w, layout, balance) for d in draws) for w in a.worlds]
            name = "one" if mean is None else f"mean {mean:,}"
            print(f"| {name} | {layout}{' balanced' if balance else ''} | " + " | ".join(f"{c:.2f}" for c in cells)
                  + " |")


if __name__ == "__main__":
    main()
