"""Per-document initial and final states `[N, H, K, V]` with packed documents (cu_seqlens) through
chunk_linear_attention: every decay kind on the torch, naive and triton (interpreter on CPU) backends against each
document run alone from its own initial state through the float64 recurrence, forward (outputs, final states) and
backward (q, k, v, g / g_gamma, initial states); and what the states refuse."""
import pytest
import torch

from harness import rel_err
from linear_cases import DECAYS, each_document_alone, make_inputs, triton_device_or_skip
from longscan.kernels.linear_attention import chunk_linear_attention

T = 80  # one full scalar chunk (64) and a partial one; two full per-key chunks (32) and a partial one
DOCUMENTS = {
    "chunk_edges": [0, 32, 64, T],                  # boundaries exactly at the chunks' edges
    "short": [0, 1, 9, 31, 33, 63, 65, T],          # a one-token first document, documents shorter than a chunk
    "single_tokens": [0, 5, 6, 7, 40, T - 1, T],    # one-token documents in a row and at the end
    "whole": [0, T],                                # one document: the whole sequence
}
STATES = {"both": (True, True), "initial": (True, False), "final": (False, True)}
DTYPES = {"float64": (torch.float64, 1e-10), "float32": (torch.float32, 1e-4)}
H = 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def case_inputs(decay, cu, K, V):
    x = make_inputs(decay, 1, T, H, K, V, torch.float64, seed=len(cu) * 10 + DECAYS.index(decay))
    n = len(cu) - 1
    h0 = torch.randn(n, H, K, V, generator=_gen(5), dtype=torch.float64)
    do = torch.randn(1, T, H, V, generator=_gen(3), dtype=torch.float64)
    dfinal = torch.randn(n, H, K, V, generator=_gen(4), dtype=torch.float64)
    leaves = {name: t for name, t in x.items() if t is not None and name != "initial_state"}
    return leaves, h0, do, dfinal


def check_against_alone(backend, dname, decay, docs, states):
    device = triton_device_or_skip() if backend == "triton" else "cpu"
    dtype, tol = DTYPES[dname]
    cu = DOCUMENTS[docs]
    use_h0, want_final = STATES[states]
    K, V = (16, 16) if backend == "triton" else (8, 5)      # the Triton kernels' head dims are powers of two
    leaves, h0, do, dfinal = case_inputs(decay, cu, K, V)
    o_ref, s_ref, g_ref = each_document_alone(leaves, h0, cu, do, dfinal, use_h0, want_final)
    lv = {n: t.to(dtype).to(device).requires_grad_() for n, t in leaves.items()}
    if use_h0:
        lv["initial_state"] = h0.to(dtype).to(device).requires_grad_()
    o, s = chunk_linear_attention(lv["q"], lv["k"], lv["v"], lv.get("g"), lv.get("g_gamma"),
                                  initial_state=lv.get("initial_state"), output_final_state=want_final,
                                  backend=backend, cu_seqlens=torch.tensor(cu))
    assert (s is None) == (not want_final)
    loss = (o * do.to(device, o.dtype)).sum() + ((s * dfinal.to(device, s.dtype)).sum() if want_final else 0)
    names = list(lv)
    grads = dict(zip(names, (d.cpu() for d in torch.autograd.grad(loss, [lv[n] for n in names]))))
    assert torch.isfinite(o).all() and rel_err(o.cpu(), o_ref) < tol
    if want_final:
        assert s.shape == (len(cu) - 1, H, K, V) and rel_err(s.cpu(), s_ref) < tol
    assert set(grads) == set(g_ref)
    for n, ref in g_ref.items():
        assert torch.isfinite(grads[n]).all(), n
        assert rel_err(grads[n], ref) < tol, n


@pytest.mark.parametrize("states", list(STATES))
@pytest.mark.parametrize("docs", list(DOCUMENTS))
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("backend,dname", [("torch", "float64"), ("torch", "float32"), ("naive", "float64")])
def test_states_match_each_document_alone(backend, dname, decay, docs, states):
    check_against_alone(backend, dname, decay, docs, states)


@pytest.mark.parametrize("docs", ["short", "single_tokens"])
@pytest.mark.parametrize("decay", DECAYS)
def test_states_match_each_document_alone_triton(decay, docs):
    """The Triton kernels run the documents as resets; the states are added around them as on the others."""
    check_against_alone("triton", "float32", decay, docs, "both")


def test_whole_sequence_document_is_the_plain_call():
    """One document over the whole sequence with states is the unpacked call with initial_state and final state."""
    leaves, h0, _, _ = case_inputs("g_per_key", [0, T], 8, 5)
    args = (leaves["q"], leaves["k"], leaves["v"], leaves["g"])
    o, s = chunk_linear_attention(*args, initial_state=h0, output_final_state=True, backend="torch",
                                  cu_seqlens=torch.tensor([0, T]))
    o_plain, s_plain = chunk_linear_attention(*args, initial_state=h0, output_final_state=True, backend="torch")
    assert rel_err(o, o_plain) < 1e-12 and rel_err(s, s_plain) < 1e-12


def test_offsets_changed_in_place_are_read_again():
    """What a call builds from cu_seqlens is kept for later calls with the same tensor, until it changes."""
    cu = torch.tensor(DOCUMENTS["chunk_edges"])
    leaves, _, _, _ = case_inputs("g_scalar", DOCUMENTS["chunk_edges"], 8, 5)
    args = (leaves["q"], leaves["k"], leaves["v"], leaves["g"])

    def finals(offsets):
        return chunk_linear_attention(*args, output_final_state=True, backend="torch", cu_seqlens=offsets)[1]
    first = finals(cu)
    assert torch.equal(finals(cu), first)
    cu[1] = 20
    moved = finals(cu)
    assert torch.equal(moved, finals(torch.tensor([0, 20, 64, T])))
    assert not torch.allclose(moved[0], first[0])


def _call(**kw):
    x = make_inputs("g_scalar", 1, T, H, 8, 5, torch.float64, seed=2)
    kw = {"backend": "torch", "cu_seqlens": torch.tensor([0, 10, T]), **kw}
    return chunk_linear_attention(x["q"], x["k"], x["v"], x["g"], **kw)


def test_states_refused():
    """An initial state that is not one per document, and states on fla (documents as padded rows), name the
    parameter before any kernel runs."""
    with pytest.raises(ValueError, match=r"must be one state per document \[N, H, K, V\] = \(2, 2, 8, 5\), "
                                         r"got \(3, 2, 8, 5\)"):
        _call(initial_state=torch.zeros(3, H, 8, 5, dtype=torch.float64))
    for kw in ({"initial_state": torch.zeros(2, H, 8, 5, dtype=torch.float64)}, {"output_final_state": True}):
        with pytest.raises(ValueError, match="backend='fla'.*without per-document initial_state or "
                                             "output_final_state"):
            _call(backend="fla", **kw)
    x = make_inputs("g_per_key", 1, T, H, 8, 5, torch.float64, seed=2)
    x["g"][0, 20, 1, 3] = float("-inf")
    args = (x["q"], x["k"], x["v"], x["g"])
    cu = torch.tensor([0, 10, T])
    chunk_linear_attention(*args, backend="torch", cu_seqlens=cu)      # without states a -inf of its own is taken
    with pytest.raises(ValueError, match="g holds -inf .* need finite log decays"):
        chunk_linear_attention(*args, output_final_state=True, backend="torch", cu_seqlens=cu)


def test_offsets_read_once_per_tensor(monkeypatch):
    """After the first call with a cu_seqlens tensor, calls with it (with and without states) neither validate nor
    rebuild anything from it: on a GPU, no read-back and no host-to-device copy."""
    from longscan.distributed import documents as validation
    from longscan.kernels.linear_attention import documents
    cu = torch.tensor(DOCUMENTS["short"])
    leaves, h0, _, _ = case_inputs("g_scalar", DOCUMENTS["short"], 8, 5)
    args = (leaves["q"], leaves["k"], leaves["v"], leaves["g"])
    first = chunk_linear_attention(*args, initial_state=h0, output_final_state=True, backend="torch", cu_seqlens=cu)
    plain = chunk_linear_attention(*args, backend="torch", cu_seqlens=cu)[0]

    def refuse(*a, **kw):
        raise AssertionError("cu_seqlens read again")
    monkeypatch.setattr(validation, "check_cu_seqlens", refuse)   # checked_cu_seqlens validates through it
    monkeypatch.setattr(documents, "to_device", refuse)
    again = chunk_linear_attention(*args, initial_state=h0, output_final_state=True, backend="torch", cu_seqlens=cu)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert torch.equal(chunk_linear_attention(*args, backend="torch", cu_seqlens=cu)[0], plain)
    with pytest.raises(AssertionError, match="read again"):       # a new tensor is read
        chunk_linear_attention(*args, backend="torch", cu_seqlens=cu.clone())


@pytest.mark.parametrize("decay", DECAYS)
def test_padded_rows_path_matches_resets(decay):
    """The documents as rows of a padded batch (the path fla takes) equal the resets, here through the torch
    backend, forward and backward (fla itself is optional)."""
    from longscan.kernels.linear_attention import _as_rows, get_backend
    cu = torch.tensor(DOCUMENTS["short"])
    leaves, _, do, _ = case_inputs(decay, DOCUMENTS["short"], 8, 5)
    outs = []
    for rows in (True, False):
        lv = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        args = (lv["q"], lv["k"], lv["v"], lv.get("g"), lv.get("g_gamma"))
        if rows:
            o = _as_rows(*args, 8 ** -0.5, get_backend("torch", torch.device("cpu")), cu)[0]
        else:
            o = chunk_linear_attention(*args, backend="torch", cu_seqlens=cu)[0]
        outs.append([o] + list(torch.autograd.grad(o, list(lv.values()), do)))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("per_key", [False, True])
def test_grouped_products_match_a_loop_and_gradcheck(per_key):
    """The two grouped products the states are made of, on a grid with padded rows and runs of no group (the last
    group): against a loop over tokens in float64, and their backward by torch.autograd.gradcheck."""
    from longscan.kernels.linear_attention.documents import GroupedMatmul, GroupedOuter, document_runs, grid_index
    cu = torch.tensor([0, 3, 4, 11, 17])
    Tn, Hn, Kn, Vn = 17, 2, 3, 2
    runs = document_runs(cu, Tn, value_dim=Vn)
    assert runs.piece < 7 and not bool(runs.slot_valid.all())        # the 7-token document spans padded rows
    grid = grid_index(runs, Hn)
    gen = _gen(11)
    x, y = torch.randn(Tn, Hn, Kn, generator=gen, dtype=torch.float64), torch.randn(Tn, Hn, Vn, generator=gen,
                                                                                   dtype=torch.float64)
    w = torch.rand(Tn, Hn, Kn if per_key else 1, generator=gen, dtype=torch.float64)
    m = torch.randn(5, Hn, Kn, Vn, generator=gen, dtype=torch.float64)
    group = torch.tensor([0, 4, 2, 4])              # per document; 4 (no group) for two of them
    row_group = group[runs.run_doc][runs.token_run[runs.slot_token[::runs.piece]]]
    tok_group = group[torch.searchsorted(cu[1:], torch.arange(Tn), right=True)]
    ref_y = torch.einsum("thk,thkv->thv", x * w, m[tok_group])
    ref_s = torch.zeros(5, Hn, Kn, Vn, dtype=torch.float64).index_add_(0, tok_group,
                                                                        torch.einsum("thk,thv->thkv", x * w, y))
    assert rel_err(GroupedMatmul.apply(x, w, m, row_group, grid), ref_y) < 1e-12
    assert rel_err(GroupedOuter.apply(x, w, y, row_group, 5, grid), ref_s) < 1e-12
    leaves = [t.clone().requires_grad_() for t in (x, w, m, y)]
    assert torch.autograd.gradcheck(lambda a, b, c: GroupedMatmul.apply(a, b, c, row_group, grid), leaves[:3])
    assert torch.autograd.gradcheck(lambda a, b, c: GroupedOuter.apply(a, b, c, row_group, 5, grid),
                                    [leaves[0], leaves[1], leaves[3]])


@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
def test_states_in_bfloat16(decay):
    """bfloat16 inputs: the states' products run in bfloat16 with float32 sums, the final states come back in
    float32, and everything stays within bfloat16's rounding of each document run alone in float64."""
    cu = DOCUMENTS["short"]
    leaves, h0, do, dfinal = case_inputs(decay, cu, 8, 5)
    o_ref, s_ref, g_ref = each_document_alone(leaves, h0, cu, do, dfinal, True, True)
    lv = {n: t.to(torch.bfloat16).requires_grad_() for n, t in leaves.items()}
    h0_in = h0.float().requires_grad_()
    o, s = chunk_linear_attention(lv["q"], lv["k"], lv["v"], lv["g"], initial_state=h0_in, output_final_state=True,
                                  backend="torch", cu_seqlens=torch.tensor(cu))
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    grads = torch.autograd.grad((o.float() * do).sum() + (s * dfinal).sum(), [lv["q"], lv["k"], lv["v"], h0_in])
    assert rel_err(o.double(), o_ref) < 2e-2 and rel_err(s.double(), s_ref) < 2e-2
    for got, name in zip(grads, ("q", "k", "v", "initial_state")):
        assert rel_err(got.double(), g_ref[name]) < 2e-2, name
