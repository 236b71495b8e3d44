"""What each SP method moves: bytes sent and received per rank for one layer's forward + backward.

One function per method. Each returns ``{kind: Traffic}``, the kinds being those the collectives report to
``longscan.distributed.stats`` (so `longscan profile` can hold a measurement against it key by key), and
counts the algorithm as written (docs/observability.md gives the same formulas):

- states (ZeCO, LASP-1, LASP-2) are `[B, H, K, V]` in the compute dtype (float32 for bf16/float32 inputs);
- K/V blocks travel in the activation dtype, dK/dV accumulators in the compute dtype;
- an all-gather of x over W ranks sends and receives (W-1)·|x|, a reduce-scatter into out (W-1)·|out|,
  an all-to-all (W-1)/W of each tensor, a ring all-reduce 2(W-1)/W of it.
"""
from __future__ import annotations

from dataclasses import dataclass

LINEAR_METHODS = ("zeco", "lasp2", "lasp1")
SOFTMAX_METHODS = ("ring", "allgather", "ulysses")


@dataclass(frozen=True)
class Traffic:
    """One rank's share of one kind of collective: bytes it sent, bytes it received, count() calls."""
    sent: int = 0
    recv: int = 0
    calls: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.sent + other.sent, self.recv + other.recv, self.calls + other.calls)


@dataclass(frozen=True)
class LinearShape:
    """One linear-attention layer on one rank: batch, heads on this TP rank, key and value head dims."""
    batch: int
    heads: int
    key_dim: int
    value_dim: int
    state_bytes_per_elem: int = 4   # the compute dtype of the states


@dataclass(frozen=True)
class SoftmaxShape:
    """One softmax-attention layer on one rank; ``local_len`` = tokens this rank holds (T / W)."""
    batch: int
    local_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    act_bytes_per_elem: int = 4     # q, k, v, o and their gradients
    acc_bytes_per_elem: int = 4     # dK/dV accumulators (float32 unless the inputs are float64)


def _check(rank: int, world: int, layout: str) -> None:
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")


def chain_hops(rank: int, world: int, layout: str) -> tuple[int, int]:
    """(sends, receives) of one rank in one pass of the chain scan over the segments in global order.

    contiguous: rank r sends to r+1 unless last, receives from r-1 unless first; zigzag (pieces r and
    2W-1-r): the chain runs 0 → W-1 → 0, so every rank sends and receives once on each leg it takes part in.
    """
    _check(rank, world, layout)
    if world == 1:
        return 0, 0
    if layout == "contiguous":
        return int(rank < world - 1), int(rank > 0)
    hops = int(rank < world - 1) + int(rank > 0)
    return hops, hops


def _state_bytes(s: LinearShape, extra_cols: int = 0) -> int:
    return s.batch * s.heads * s.key_dim * (s.value_dim + extra_cols) * s.state_bytes_per_elem


def _final_state_traffic(rank: int, world: int, layout: str, state: int) -> dict[str, Traffic]:
    """output_final_state with a chain scan: a broadcast from the last segment's owner, and in the backward an
    all-reduce of the final state's gradient."""
    last = world - 1 if layout == "contiguous" else 0
    ring = 2 * (world - 1) * state // world
    bcast = Traffic(sent=state, calls=1) if rank == last else Traffic(recv=state, calls=1)
    return {"state_broadcast": bcast, "state_all_reduce": Traffic(ring, ring, 1)}


def zeco_bytes(rank: int, world: int, layout: str, shape: LinearShape, n_blocks: int = 4,
               final_state: bool = False) -> dict[str, Traffic]:
    """ZeCO: the All-Scan sends each state once per hop (in n_blocks K-blocks), forward; the reverse scan of
    the state gradients sends back along the same hops, backward. Per rank: (sends + receives) · |S| each way."""
    if world == 1:
        return {}
    sends, recvs = chain_hops(rank, world, layout)
    state = _state_bytes(shape)
    hops = sends + recvs   # forward: sends out, recvs in; backward: the reverse
    out = {"all_scan": Traffic(sent=hops * state, recv=hops * state, calls=2 * n_blocks * hops)}
    if final_state:
        out.update(_final_state_traffic(rank, world, layout, state))
    return out


def lasp1_bytes(rank: int, world: int, layout: str, shape: LinearShape, final_state: bool = False) -> dict[str, Traffic]:
    """LASP-1: the same hops as ZeCO, each carrying the whole state as one message."""
    return zeco_bytes(rank, world, layout, shape, n_blocks=1, final_state=final_state)


def lasp2_bytes(rank: int, world: int, layout: str, shape: LinearShape, final_state: bool = False) -> dict[str, Traffic]:
    """LASP-2: forward, one all-gather of every rank's n_local states with their log decay as an extra column
    (`[n_local, B, H, K, V+1]`); backward, one all-gather of the state gradients plus a final-state-gradient
    row (`[n_local + 1, B, H, K, V+1]`, sent whether or not a final state was asked for)."""
    _check(rank, world, layout)
    if world == 1:
        return {}
    n_local = 2 if layout == "zigzag" else 1
    row = _state_bytes(shape, extra_cols=1)
    b = (world - 1) * (n_local + (n_local + 1)) * row
    return {"state_allgather": Traffic(sent=b, recv=b, calls=2)}


def delta_lasp2_bytes(rank: int, world: int, layout: str, shape: LinearShape) -> dict[str, Traffic]:
    """LASP-2 for the delta rule: forward, one all-gather of every rank's n_local affine maps (M | S)
    `[n_local, B, H, K, K+V]`; backward, one all-gather of the carries' gradients with a final-state-gradient
    row `[n_local + 1, B, H, K, V]`. Every rank scans the gathered maps itself, so the final state needs
    nothing more."""
    _check(rank, world, layout)
    if world == 1:
        return {}
    n_local = 2 if layout == "zigzag" else 1
    b = (world - 1) * (n_local * _state_bytes(shape, extra_cols=shape.key_dim) + (n_local + 1) * _state_bytes(shape))
    return {"state_allgather": Traffic(sent=b, recv=b, calls=2)}


def conv_halo_bytes(rank: int, world: int, layout: str, batch: int, channels: int, elem_bytes: int,
                    width: int = 3, tensors: int = 3) -> dict[str, Traffic]:
    """The delta-rule layers' short convolutions (``longscan.models.conv``): each of ``tensors`` (q, k, v)
    sends every local piece's last ``width`` tokens `[B, width, channels]` to the owner of the next piece and
    receives the previous piece's, forward; the gradients go back the same hops, backward. One message a hop
    and direction; pieces whose neighbour is on this rank move nothing."""
    _check(rank, world, layout)
    if world == 1:
        return {}
    sends, recvs = chain_hops(rank, world, layout)
    msg = batch * width * channels * elem_bytes
    hops = sends + recvs
    return {"conv_halo": Traffic(sent=tensors * hops * msg, recv=tensors * hops * msg, calls=2 * tensors * hops)}


def ring_bytes(rank: int, world: int, layout: str, shape: SoftmaxShape) -> dict[str, Traffic]:
    """Ring attention: forward, K and V travel W-1 hops; backward, K and V travel W-1 hops again and the
    dK/dV accumulators W hops (home to their owner)."""
    _check(rank, world, layout)
    if world == 1:
        return {}
    kv = 2 * shape.batch * shape.local_len * shape.kv_heads * shape.head_dim
    act, acc = kv * shape.act_bytes_per_elem, kv * shape.acc_bytes_per_elem
    b = 2 * (world - 1) * act + world * acc
    return {"ring_p2p": Traffic(sent=b, recv=b, calls=2 * (2 * (world - 1) + world))}


def allgather_bytes(rank: int, world: int, layout: str, shape: SoftmaxShape,
                    chunk_heads: int | None = None) -> dict[str, Traffic]:
    """All-gather K/V (LASP-2H): K and V all-gathered in the forward and again in the backward; dK and dV
    reduce-scattered (accumulator dtype) in the backward. chunk_heads splits the same bytes over more calls."""
    _check(rank, world, layout)
    if world == 1:
        return {}
    chunks = -(-shape.kv_heads // (chunk_heads or shape.kv_heads))
    one = shape.batch * shape.local_len * shape.kv_heads * shape.head_dim   # K (or V) on this rank
    gather = 2 * 2 * (world - 1) * one * shape.act_bytes_per_elem
    scatter = 2 * (world - 1) * one * shape.acc_bytes_per_elem
    return {"kv_allgather": Traffic(gather, gather, 4 * chunks),
            "dkv_reduce_scatter": Traffic(scatter, scatter, 2 * chunks)}


def ulysses_bytes(rank: int, world: int, layout: str, shape: SoftmaxShape) -> dict[str, Traffic]:
    """Ulysses: all-to-alls of q, k, v and o in the forward and of dO, dQ, dK, dV in the backward, each
    keeping 1/W of its tensor and exchanging the rest."""
    _check(rank, world, layout)
    if world == 1:
        return {}
    per_token = shape.batch * shape.local_len * shape.head_dim * shape.act_bytes_per_elem
    q, kv = per_token * shape.q_heads, per_token * shape.kv_heads
    one = lambda n: n * (world - 1) // world   # noqa: E731  (integer bytes per tensor, as counted)
    b = 4 * one(q) + 4 * one(kv)
    return {"ulysses_all_to_all": Traffic(b, b, 8)}


def linear_method_bytes(method: str, rank: int, world: int, layout: str, shape: LinearShape,
                        n_blocks: int = 4) -> dict[str, Traffic]:
    """The formula of ``method`` (zeco | lasp2 | lasp1) for one layer, as the model calls it (no final state)."""
    if method == "zeco":
        return zeco_bytes(rank, world, layout, shape, n_blocks)
    if method == "lasp2":
        return lasp2_bytes(rank, world, layout, shape)
    if method == "lasp1":
        return lasp1_bytes(rank, world, layout, shape)
    raise ValueError(f"linear method must be one of {', '.join(LINEAR_METHODS)}, got {method!r}")


def delta_method_bytes(method: str, rank: int, world: int, layout: str, shape: LinearShape, n_blocks: int = 4,
                       transition: str = "matrix", final_state: bool = False) -> dict[str, Traffic]:
    """The formula of the delta rule's ``method`` for one layer. ZeCO and LASP-1 carry one `[K, V]` state a hop
    as the diagonal decays do, with the K×K transition applied on each rank (``transition="matrix"``, the
    All-Scan's bytes) or the state relayed through each rank's own pass (``"relay"``, labelled
    "delta_relay"); LASP-2 gathers the affine maps (:func:`delta_lasp2_bytes`)."""
    if method == "lasp2":
        return delta_lasp2_bytes(rank, world, layout, shape)
    if method not in ("zeco", "lasp1"):
        raise ValueError(f"linear method must be one of {', '.join(LINEAR_METHODS)}, got {method!r}")
    out = zeco_bytes(rank, world, layout, shape, n_blocks if method == "zeco" else 1, final_state)
    if method == "zeco" and transition == "relay" and "all_scan" in out:
        out["delta_relay"] = out.pop("all_scan")
    return out


def softmax_method_bytes(method: str, rank: int, world: int, layout: str, shape: SoftmaxShape) -> dict[str, Traffic]:
    """The formula of ``method`` (ring | allgather | ulysses) for one layer."""
    if method == "ring":
        return ring_bytes(rank, world, layout, shape)
    if method == "allgather":
        return allgather_bytes(rank, world, layout, shape)
    if method == "ulysses":
        return ulysses_bytes(rank, world, layout, shape)
    raise ValueError(f"softmax method must be one of {', '.join(SOFTMAX_METHODS)}, got {method!r}")


def total(traffic: dict[str, Traffic]) -> Traffic:
    out = Traffic()
    for t in traffic.values():
        out = out + t
    return out
