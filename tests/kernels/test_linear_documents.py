"""Packed documents (cu_seqlens) through chunk_linear_attention: every decay kind on the torch and naive
backends against each document run alone through the float64 recurrence (outputs concatenated), forward and
backward; and the inputs that packed documents refuse (per-document states: test_linear_document_states.py)."""
import pytest
import torch

from harness import rel_err
from linear_cases import DECAYS, make_inputs, triton_device_or_skip
from longscan.kernels.linear_attention import chunk_linear_attention, naive_recurrent_linear_attention

T = 80  # one full scalar chunk (64) and a partial one; two full per-key chunks (32) and a partial one
DOCUMENTS = {
    "chunk_edges": [0, 32, 64, T],                  # boundaries exactly at the chunks' edges
    "short": [0, 1, 9, 31, 33, 63, 65, T],          # a one-token first document, boundaries beside chunk edges
    "single_tokens": [0, 5, 6, 7, 40, T - 1, T],    # one-token documents in a row and at the end
    "one": [0, T],                                  # no reset: the plain call
}
DTYPES = {"float64": (torch.float64, 1e-10), "float32": (torch.float32, 1e-4)}


def leaves_of(x, dtype):
    return {n: t.to(dtype).clone().requires_grad_() for n, t in x.items()
            if t is not None and n != "initial_state"}


def grads_of(o, leaves, do):
    names = list(leaves)
    return dict(zip(names, torch.autograd.grad(o, [leaves[n] for n in names], do.to(o.dtype))))


def each_document_alone(x, cu, do):
    """The float64 recurrence on every document alone, outputs concatenated, and the gradients."""
    lv = leaves_of(x, torch.float64)
    g, g_gamma = lv.get("g"), lv.get("g_gamma")
    outs = [naive_recurrent_linear_attention(lv["q"][:, a:b], lv["k"][:, a:b], lv["v"][:, a:b],
                                             g[:, a:b] if g is not None else None, g_gamma)[0]
            for a, b in zip(cu[:-1], cu[1:])]
    o = torch.cat(outs, 1)
    return o, grads_of(o, lv, do)


@pytest.mark.parametrize("docs", list(DOCUMENTS))
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("backend,dname", [("torch", "float64"), ("torch", "float32"), ("naive", "float64"),
                                           ("triton", "float32")])
def test_documents_match_each_document_alone(backend, dname, decay, docs):
    """torch, naive and triton (interpreter on CPU) take the documents as resets."""
    device = triton_device_or_skip() if backend == "triton" else "cpu"
    dtype, tol = DTYPES[dname]
    cu = DOCUMENTS[docs]
    K, V = (16, 16) if backend == "triton" else (8, 5)      # the Triton kernels' head dims are powers of two
    x = make_inputs(decay, 1, T, 2, K, V, torch.float64, seed=len(cu) * 10 + DECAYS.index(decay))
    do = torch.randn(1, T, 2, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    o_ref, g_ref = each_document_alone(x, cu, do)
    lv = {n: t.detach().to(device).requires_grad_() for n, t in leaves_of(x, dtype).items()}
    before = {n: t.detach().clone() for n, t in lv.items()}
    o, s = chunk_linear_attention(lv["q"], lv["k"], lv["v"], lv.get("g"), lv.get("g_gamma"), backend=backend,
                                  cu_seqlens=torch.tensor(cu))
    assert s is None
    grads = {n: t.cpu() for n, t in grads_of(o, lv, do.to(device)).items()}
    o, lv = o.cpu(), {n: t.cpu() for n, t in lv.items()}
    before = {n: t.cpu() for n, t in before.items()}
    assert all(torch.equal(lv[n].detach(), before[n]) for n in lv)      # the resets went into a copy
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < tol
    assert set(grads) == set(g_ref)
    for n, ref in g_ref.items():
        assert torch.isfinite(grads[n]).all(), n
        assert rel_err(grads[n], ref) < tol, n
    if decay in ("g_scalar", "g_per_key"):        # the gate at a document's first token reaches nothing
        assert (grads["g"][:, cu[1:-1]] == 0).all()


def test_documents_differ_from_one_sequence():
    """The documents' outputs are not the whole sequence's (the reference above could not pass unpacked)."""
    x = make_inputs("g_scalar", 1, T, 2, 8, 5, torch.float64, seed=1)
    args = (x["q"], x["k"], x["v"], x["g"])
    packed = chunk_linear_attention(*args, backend="torch", cu_seqlens=torch.tensor(DOCUMENTS["short"]))[0]
    whole = chunk_linear_attention(*args, backend="torch")[0]
    assert torch.equal(packed[:, :1], whole[:, :1]) and rel_err(packed, whole) > 1e-2
    int32 = chunk_linear_attention(*args, backend="torch",
                                   cu_seqlens=torch.tensor(DOCUMENTS["short"], dtype=torch.int32))[0]
    assert torch.equal(int32, packed)


def _call(**kw):
    x = make_inputs("g_scalar", kw.pop("B", 1), T, 2, 8, 5, torch.float64, seed=2)
    kw = {"backend": "torch", "cu_seqlens": torch.tensor([0, 10, T]), **kw}
    return chunk_linear_attention(x["q"], x["k"], x["v"], x["g"], **kw)


@pytest.mark.parametrize("kw,match", [
    ({"B": 2}, r"cu_seqlens packs documents into one sequence: q must be \[1, T, H, K\], got batch 2"),
    ({"initial_state": torch.zeros(1, 2, 8, 5, dtype=torch.float64)},
     r"initial_state with cu_seqlens of 2 documents must be one state per document \[N, H, K, V\] = \(2, 2, 8, 5\)"),
    ({"cu_seqlens": torch.tensor([0, 10, T - 1])}, "cu_seqlens must start at 0 and end at the global length"),
    ({"cu_seqlens": torch.tensor([0, 10, 10, T])}, "cu_seqlens must be strictly increasing"),
    ({"cu_seqlens": torch.tensor([0.0, T])}, "cu_seqlens must be a 1-D int32/int64"),
], ids=["batch", "initial_state", "end", "increasing", "dtype"])
def test_documents_refuse(kw, match):
    with pytest.raises(ValueError, match=match):
        _call(**kw)


def test_auto_taken_where_it_picks_triton():
    """backend="auto" resolves to the Triton kernels on CUDA, which take documents as resets over an SP group too;
    fla, the one backend not known to compute them exactly, is refused there."""
    from longscan.kernels.linear_attention import check_documents, get_backend
    try:
        triton = get_backend("triton", torch.device("cpu"))
    except ValueError as e:
        pytest.skip(f"triton not importable: {e}")
    q = torch.zeros(1, 4, 2, 8)
    check_documents(q, None, False, "auto", get_backend("auto", q.device))      # torch here
    check_documents(q, None, False, "auto", triton)
    with pytest.raises(ValueError, match="needs backend='torch', 'naive' or 'triton'.*got backend='fla'"):
        check_documents(q, None, False, "fla")
