"""Local softmax attention with packed documents: every backend against per-document float64 attention.

The reference runs each document on its own (naive float64, causal); the kernels see the packed sequence
with document ids. Triton runs in the CPU interpreter in float32 without CUDA: sizes stay small.
"""
import pytest
import torch

from harness import rel_err
from longscan.distributed.documents import document_ids
from longscan.kernels.softmax_attention import (BlockDocs, attention, block_backward, block_forward,
                                                naive_attention, naive_backward, resolve_backend)
from longscan.kernels.softmax_attention.naive import document_mask

CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "naive", "triton"]


def inputs(T, Tk, hq, hkv, d, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, d, generator=gen, dtype=torch.float64).to(dtype)
            for n, h in ((T, hq), (Tk, hkv), (Tk, hkv), (T, hq))]


def per_document(q, k, v, do, cu):
    """Output and gradients of causal attention run separately on every document, float64."""
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, _ = naive_attention(ref[0][:, a:b], ref[1][:, a:b], ref[2][:, a:b], None, True)
        outs.append(o)
    o = torch.cat(outs, 1)
    return o.detach(), torch.autograd.grad(o, ref, do.double())


# lengths: single tokens, a document longer than a 32-row tile, one spanning almost everything; with 80
# tokens in 32-row tiles, the last tiles skip the first key blocks and the first key blocks the last q tiles;
# [3, 130, 7]: tiles of one document that see whole blocks of it (run without the mask) in every kernel
DOC_LENGTHS = [[45], [1, 1, 40, 1, 2], [3, 5, 7, 11, 19], [44, 1], [1] * 20 + [25], [30, 20, 30], [3, 130, 7]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", DOC_LENGTHS, ids=lambda x: "-".join(map(str, x[:6])))
def test_attention_per_document(backend, lengths):
    if backend == "triton":
        pytest.importorskip("triton")
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    dev = "cuda" if CUDA and backend == "triton" else "cpu"
    q, k, v, do = inputs(T, T, 4, 2, 16, seed=len(lengths))
    o_ref, g_ref = per_document(q, k, v, do, cu)
    loc = [x.to(dev).requires_grad_() for x in (q, k, v)]
    o = attention(*loc, causal=True, backend=backend, cu_seqlens=cu)
    grads = torch.autograd.grad(o, loc, do.to(dev))
    assert rel_err(o.cpu(), o_ref) <= 1e-4
    for name, got, want in zip(("dq", "dk", "dv"), grads, g_ref):
        assert rel_err(got.cpu(), want) <= 1e-4, name


def ring_step_docs(T, Tk, seed):
    """Sorted document ids of a query block and a later-or-earlier key block that share some documents.
    T = Tk = 96: one long shared document, so 32-row tiles see whole blocks of it (run without the mask)."""
    if T == Tk == 96:
        return torch.tensor([0] * 10 + [1] * 86), torch.tensor([1] * 70 + [2] * 26)
    gen = torch.Generator().manual_seed(seed)
    qd = torch.randint(0, 4, (T,), generator=gen).sort().values
    kd = torch.randint(1, 5, (Tk,), generator=gen).sort().values
    return qd, kd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,Tk", [(40, 24), (24, 40), (96, 96)])
def test_full_block_with_documents(backend, T, Tk):
    """A ring step's block ("full" mask, different q and k documents): some rows see no key at all and
    must give o = 0, lse = -inf; backward with the rows' final (o, lse) from another block added in."""
    if backend == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if CUDA and backend == "triton" else "cpu"
    q, k, v, do = inputs(T, Tk, 2, 2, 16, seed=T)
    qd, kd = ring_step_docs(T, Tk, seed=T)
    mask = document_mask(qd, kd, False)
    assert (~mask).all(1).any() and mask.any()            # the case has rows that see nothing
    o_ref, lse_ref = naive_attention(q, k, v, None, False, mask)
    docs = BlockDocs(qd.to(dev), kd.to(dev))
    o, lse = block_forward(*(x.to(dev) for x in (q, k, v)), q.shape[-1] ** -0.5, "full", backend, docs)
    seen = mask.any(1)
    assert rel_err(o.cpu().double(), o_ref) <= 1e-4
    assert torch.isinf(lse.cpu()[0, :, ~seen]).all() and (lse.cpu()[0, :, ~seen] < 0).all()
    assert rel_err(lse.cpu()[0, :, seen].double(), lse_ref[0, :, seen]) <= 1e-4
    # rows' final lse: this block plus a diagonal one every row sees (each token sees itself)
    lse_fin = torch.logaddexp(lse_ref, torch.randn(lse_ref.shape, dtype=torch.float64))
    o_fin = torch.randn(o_ref.shape, dtype=torch.float64)
    want = naive_backward(do, q, k, v, o_fin, lse_fin, None, False, mask)
    got = block_backward(*(x.to(dev) for x in (do, q, k, v)), o_fin.float().to(dev), lse_fin.float().to(dev),
                         q.shape[-1] ** -0.5, "full", backend, docs)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(g.cpu().double(), w) <= 1e-4, name


def test_sdpa_refuses_documents_and_auto_picks_a_masking_kernel():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="cannot mask packed documents"):
        resolve_backend("sdpa_flash", q, documents=True)
    assert resolve_backend("auto", q, documents=True) == "torch"


def test_bad_cu_seqlens_for_attention():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="end at the global length 8"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match=r"q must be \[1, T, H, D\]"):
        attention(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                  cu_seqlens=torch.tensor([0, 8]))
    assert document_ids(torch.tensor([0, 2, 8]), 8).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def tile_bounds_by_searchsorted(a_doc, b_doc, tile, step):
    """The Triton kernels' tile bounds in plain torch: searchsorted of each tile's first and last document."""
    n = a_doc.numel()
    last = torch.arange(tile - 1, -(-n // tile) * tile, tile).clamp_max(n - 1)
    first_doc, last_doc = a_doc[0::tile].contiguous(), a_doc[last]
    lo = torch.searchsorted(b_doc, first_doc)
    hi = torch.searchsorted(b_doc, last_doc, right=True)
    one = first_doc == last_doc
    f_lo = torch.where(one, (lo + step - 1) // step * step, 0)
    f_hi = torch.where(one, hi // step * step, 0)
    return torch.stack([lo, hi, f_lo, f_hi], 1).to(torch.int32)


@pytest.mark.parametrize("n, m, tile, step", [(80, 80, 32, 16), (300, 37, 16, 64), (1, 1, 64, 64),
                                              (5, 200, 128, 32), (129, 129, 64, 128)])
def test_tile_bounds_kernel(n, m, tile, step):
    """The one-launch binary search gives searchsorted's bounds: documents the other side lacks, tiles of one
    document and of several, a last partial tile, and (the long case) tiles over more than one program."""
    tf = pytest.importorskip("longscan.kernels.softmax_attention.triton_flash")
    dev = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(n * 1000 + m)
    for trial in range(4):
        # the two sides draw ids from overlapping ranges, so some of a's documents are missing from b
        a = torch.randint(0, 12, (n,), generator=gen).sort().values + trial
        b = torch.randint(0, 12, (m,), generator=gen).sort().values + 2 * trial
        got = tf._tile_bounds(a.to(dev, torch.int32), b.to(dev, torch.int32), tile, step)
        assert torch.equal(got.cpu(), tile_bounds_by_searchsorted(a, b, tile, step)), trial
    a = torch.arange(129 * 64) // 7                               # 129 tiles of 64: two programs of 128
    got = tf._tile_bounds(a.to(dev, torch.int32), a.to(dev, torch.int32), 64, 64)
    assert torch.equal(got.cpu(), tile_bounds_by_searchsorted(a, a, 64, 64))
