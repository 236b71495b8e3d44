"""memory.pinned = exact: offloaded inputs in exactly-sized page-locked host buffers (PinnedPool).

The pool's bookkeeping runs on CPU with a recording register/unregister pair and fake copy events: exact sizes,
reuse across steps (last in, first out), a new length replacing the old one's buffers, a failed page-lock turned
into HostMemoryError. The estimator, the capacity check and `longscan plan` count exact bytes under exact and
power-of-two blocks under torch. One spawn of one gloo process trains the tiny hybrid with offload under both
settings (on CPU the pool keeps plain host buffers, the same code path): the same loss and gradients, bitwise,
and the second step registers nothing new. On CUDA the buffers are pinned and the copies asynchronous.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import run_distributed
from longscan.models.args import MemoryOptions, ModelConfig
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.memory import GiB, Layout, check_capacity, estimate_config, offloaded_host_bytes
from longscan.training.offload import HostMemoryError, HostStash, offloaded_checkpoint
from longscan.training.pinned_pool import PinnedPool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_1M = os.path.join(REPO, "configs", "hybrid_1b_1m.yaml")
LONG = "data.seq_len=1310720"  # 5 GiB a bf16 block input: 8 GiB once rounded up to a power of two


class Recorder:
    """A register/unregister pair that records its calls (and can refuse the n-th register)."""

    def __init__(self, fail_at: int | None = None):
        self.registered, self.unregistered, self.fail_at = [], [], fail_at

    def register(self, ptr, nbytes):
        if self.fail_at is not None and len(self.registered) + 1 == self.fail_at:
            raise RuntimeError("cudaHostRegister of %d bytes failed (cudaErrorMemoryAllocation)" % nbytes)
        self.registered.append((ptr, nbytes))

    def unregister(self, ptr):
        self.unregistered.append(ptr)


class FakeEvent:
    """Stands for the copy back's CUDA event: records whether a writer waited on it, or the host did."""

    def __init__(self):
        self.waited = self.synchronized = 0

    def wait(self, stream=None):
        self.waited += 1

    def synchronize(self):
        self.synchronized += 1


def _pool(fail_at=None, page=1):
    rec = Recorder(fail_at)
    return PinnedPool(rec.register, rec.unregister, page=page), rec


def test_buffers_are_exactly_sized_and_reused_last_in_first_out():
    pool, rec = _pool()
    shape = (3, 1000, 5)  # 15,000 float32: 60,000 bytes (a power of two would take 65,536)
    step1 = [pool.allocate(torch.Size(shape), torch.float32) for _ in range(3)]
    assert all(t.shape == shape and t.dtype == torch.float32 for t in step1)
    assert [n for _, n in rec.registered] == [60000] * 3
    assert [p for p, _ in rec.registered] == [t.data_ptr() for t in step1]
    assert pool.registered_bytes == pool.lent_bytes == 180000 and pool.peak_registered_bytes == 180000
    for t in step1:  # distinct buffers, each writable over its whole extent
        t.fill_(1.0)
    assert len({t.data_ptr() for t in step1}) == 3
    events = [FakeEvent() for _ in step1]
    for t, ev in zip(reversed(step1), reversed(events)):  # the backward takes the inputs back last first
        pool.release(t, ev)
    assert pool.lent_bytes == 0 and pool.registered_bytes == 180000
    # the next step: no new page-locking; the buffer given back last comes first, each after its copy's event
    step2 = [pool.allocate(torch.Size(shape), torch.float32) for _ in range(3)]
    assert len(rec.registered) == 3 and rec.unregistered == []
    assert [t.data_ptr() for t in step2] == [t.data_ptr() for t in step1]
    assert [ev.waited for ev in events] == [1, 1, 1] and all(ev.synchronized == 0 for ev in events)
    # another dtype of the same byte size shares the buffers
    for t in step2:
        pool.release(t)
    same_bytes = pool.allocate(torch.Size((30000,)), torch.bfloat16)
    assert same_bytes.dtype == torch.bfloat16 and len(rec.registered) == 3
    assert [ev.waited for ev in events] == [1, 1, 1]  # released without an event: nothing left to wait for


def test_a_new_size_replaces_the_free_buffers_of_the_old_one():
    pool, rec = _pool()
    old = [pool.allocate(torch.Size((64, 8)), torch.float32) for _ in range(2)]
    events = [FakeEvent(), FakeEvent()]
    for t, ev in zip(old, events):
        pool.release(t, ev)
    kept = pool.allocate(torch.Size((64, 8)), torch.float32)  # the last given back, still lent
    assert kept.data_ptr() == old[1].data_ptr() and events[1].waited == 1
    new = pool.allocate(torch.Size((128, 8)), torch.float32)
    assert [n for _, n in rec.registered] == [2048, 2048, 4096]
    # the free one of the old size was unlocked (after its copy finished), the lent one was not
    assert rec.unregistered == [old[0].data_ptr()] and events[0].synchronized == 1
    assert pool.registered_bytes == 2048 + 4096
    pool.release(kept), pool.release(new)
    pool.clear()
    assert sorted(rec.unregistered) == sorted([old[0].data_ptr(), kept.data_ptr(), new.data_ptr()])
    assert pool.registered_bytes == 0 and pool.free == {}


def test_each_buffer_locks_whole_pages_of_its_own():
    pool, rec = _pool(page=4096)
    bufs = [pool.allocate(torch.Size((1000 + i,)), torch.float32) for i in range(3)]  # 4000.. bytes: one page
    assert [n for _, n in rec.registered] == [4096, 4096, 4096] and pool.registered_bytes == 3 * 4096
    for (ptr, _), t in zip(rec.registered, bufs):
        # the storage starts at the locked page: torch's is_pinned() asks the driver about a storage's first byte
        assert ptr % 4096 == 0 and t.data_ptr() == ptr and t.untyped_storage().data_ptr() == ptr
    assert len({ptr // 4096 for ptr, _ in rec.registered}) == 3  # no page shared
    big = pool.allocate(torch.Size((3, 1000, 5)), torch.float32)  # 60,000 bytes: 15 pages
    assert rec.registered[-1] == (big.data_ptr(), 15 * 4096) and pool.lent_bytes == 4000 + 4004 + 4008 + 60000
    with pytest.raises(ValueError, match="page must be a power of two"):
        PinnedPool(page=3000)


def test_release_refuses_a_tensor_it_did_not_lend():
    pool, _ = _pool()
    t = pool.allocate(torch.Size((4, 4)), torch.float32)
    with pytest.raises(ValueError, match="did not lend"):
        pool.release(torch.empty(4, 4))
    pool.release(t)
    with pytest.raises(ValueError, match="released already"):
        pool.release(t)


def test_a_failed_page_lock_is_a_host_memory_error():
    pool, rec = _pool(fail_at=3)
    stash = HostStash(torch.device("cpu"), pool.allocate, pool.release)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    stash.put(a), stash.put(b)
    with pytest.raises(HostMemoryError) as e:
        stash.put(torch.randn(5, 8))
    msg = str(e.value)
    assert "(160 bytes) asked" in msg and "(256 bytes) already held" in msg and "2 offloaded input" in msg
    assert "memory.linear_layers / softmax_layers / mlp" in msg and "parallel.sp" in msg
    assert "cudaHostRegister of 160 bytes failed" in str(e.value.__cause__)
    assert pool.registered_bytes == 256 and len(pool.lent) == 2 and len(stash.entries) == 2
    # what the stash held comes back intact, and goes back to the pool
    assert torch.equal(stash.take(1), b) and torch.equal(stash.take(0), a)
    assert pool.lent == {} and sum(len(v) for v in pool.free.values()) == 2


def test_the_stash_gives_buffers_back_when_taken_and_when_dropped():
    pool, rec = _pool()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    stash = HostStash(torch.device("cpu"), pool.allocate, pool.release)
    ids = [stash.put(x) for x in xs]
    assert pool.lent_bytes == stash.held_bytes == 3 * 48 * 8
    assert torch.equal(stash.take(ids[2]), xs[2]) and pool.lent_bytes == 2 * 48 * 8
    del stash  # a forward whose backward never ran: its buffers are not lost to the pool
    assert pool.lent == {} and len(pool.free[48 * 8]) == 3 and len(rec.registered) == 3


def test_offload_through_the_pool_is_exact():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    pool, rec = _pool()

    def grads(stash):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        f = lambda t: torch.tanh(t @ ws) + t  # noqa: E731
        y = offloaded_checkpoint(f, offloaded_checkpoint(f, xs, [ws], stash), [ws], stash) if stash else f(f(xs))
        y.pow(2).sum().backward()
        return xs.grad, ws.grad
    ref = grads(None)
    for _ in range(2):  # two steps: the second page-locks nothing
        got = grads(HostStash(x.device, pool.allocate, pool.release))
        for p, q in zip(got, ref):
            assert torch.allclose(p, q, rtol=1e-12, atol=0)
    assert len(rec.registered) == 2 and pool.lent == {}


def test_config_key_is_validated():
    with pytest.raises(ConfigError, match=r"memory.pinned = 'pow2' is not allowed; choose one of torch, exact"):
        load_config(CONFIG_1M, ["memory.pinned=pow2"])
    with pytest.raises(ValueError, match="memory.pinned"):
        MemoryOptions(pinned="exactly")
    assert validate(load_config(CONFIG_1M, []), 1).memory.options().pinned == "torch"
    assert validate(load_config(CONFIG_1M, ["memory.pinned=exact"]), 1).memory.options().pinned == "exact"


def test_host_estimate_exact_against_power_of_two():
    m = ModelConfig(dim=48, n_layers=8, pattern="LLLN", n_heads=4, n_kv_heads=2, vocab_size=100)
    one = 4 * 48 * 1000  # 192,000 bytes, 262,144 rounded
    for pinned, block in (("torch", 262144), ("exact", one)):
        mem = MemoryOptions("offload", "checkpoint", "offload", pinned=pinned)
        assert offloaded_host_bytes(m, Layout(seq_len=1000), mem) == {"linear mixers": 6 * block, "MLPs": 8 * block}
        assert offloaded_host_bytes(m, Layout(seq_len=1000), mem, pinned=False) == \
            {"linear mixers": 6 * one, "MLPs": 8 * one}  # CPU runs: plain copies either way


def test_the_1m_config_at_1_25m_tokens_needs_100_gib_exact_160_rounded():
    """20 offloaded blocks of bf16 [1,310,720, 2048] inputs: 5 GiB each exactly, 8 GiB rounded."""
    for pinned, per_block in (("torch", 8), ("exact", 5)):
        cfg = validate(load_config(CONFIG_1M, [LONG, f"memory.pinned={pinned}"]), 1)
        assert estimate_config(cfg, 1).host == {"blocks": 20 * per_block * GiB}
    # at 1,048,576 tokens each block is 4 GiB, a power of two: both count 80 GiB
    for pinned in ("torch", "exact"):
        assert estimate_config(validate(load_config(CONFIG_1M, [f"memory.pinned={pinned}"]), 1), 1).host_bytes \
            == 80 * GiB


def test_capacity_check_counts_exact_bytes_and_names_the_setting():
    torch_cfg = validate(load_config(CONFIG_1M, [LONG]), 1)
    with pytest.raises(ConfigError) as e:
        check_capacity(torch_cfg, 1, capacity_bytes=141 * GiB, host_bytes=125 * GiB, procs_per_node=1)
    msg = str(e.value)
    assert "160.0 GiB per process" in msg and "memory.pinned = torch: rounded up to a power of two" in msg
    assert "memory.pinned=exact page-locks exactly each input's bytes" in msg and "100.0 GiB per process, which fits" \
        in msg
    exact = validate(load_config(CONFIG_1M, [LONG, "memory.pinned=exact"]), 1)
    assert check_capacity(exact, 1, capacity_bytes=141 * GiB, host_bytes=125 * GiB, procs_per_node=1).host_bytes \
        == 100 * GiB
    with pytest.raises(ConfigError) as e:
        check_capacity(exact, 1, capacity_bytes=141 * GiB, host_bytes=96 * GiB, procs_per_node=1)
    assert "100.0 GiB per process" in str(e.value) and "memory.pinned = exact: exactly its bytes" in str(e.value)
    assert "memory.pinned=exact page-locks" not in str(e.value)  # already chosen


def test_plan_counts_exact_bytes_and_fits_longer_sequences_under_a_host_limit():
    from longscan.observe.plan import Interconnect, costs_for, host_per_process, predict
    net = Interconnect("test", 100e9, 5e-6)
    costs = costs_for("h200", None)
    out = {}
    for pinned in ("torch", "exact"):
        cfg = validate(load_config(CONFIG_1M, [LONG, f"memory.pinned={pinned}"]), 1)
        out[pinned] = (host_per_process(cfg), predict(cfg, costs, net, host_bytes=125 * GiB).max_seq_len)
    assert out["torch"][0] == 160 * GiB and out["exact"][0] == 100 * GiB
    # rounded, every length above 1,048,576 takes 8 GiB a block: 160 GiB, over the host's 125
    assert out["torch"][1] == 1048576
    assert out["exact"][1] > 1310720


def _train(rank, world):
    from megatron.core import parallel_state as ps

    from longscan.models.model import HybridLM, SPSpec
    from longscan.training.parallel import stage_config
    ps.initialize_model_parallel(1, create_gloo_process_groups=False)
    cfg = ModelConfig(dim=32, n_layers=4, pattern="LLLN", n_heads=4, n_kv_heads=2, linear_variant="lightning",
                      vocab_size=100)
    torch.manual_seed(0)
    out = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device, modes in [(d, m) for d in devices for m in (
            dict(blocks="offload"), dict(linear_layers="offload", softmax_layers="offload", mlp="checkpoint"))]:
        for pinned in ("torch", "exact"):
            model = HybridLM(cfg, stage_config(1, 1, 1, cfg.dim, torch.float32), SPSpec(linear_backend="torch"),
                             seed=0, memory=MemoryOptions(pinned=pinned, **modes)).to(device).train()
            steps = []
            for step in range(2):
                tokens = torch.randint(0, 100, (1, 49), generator=torch.Generator().manual_seed(step)).to(device)
                loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
                loss.backward()
                pool = model.host_pool
                steps.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()},
                              None if pool is None else (pool.registered_bytes, pool.lent_bytes,
                                                         sorted((k, len(v)) for k, v in pool.free.items()),
                                                         all(b.memory.is_pinned() == (device == "cuda")
                                                             for v in pool.free.values() for b in v))))
                model.zero_grad(set_to_none=True)
            out[(device, tuple(modes.values()), pinned)] = steps
    return out


@pytest.fixture(scope="module")
def trained():
    return run_distributed(_train, 1)[0]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("modes", [("offload",), ("offload", "offload", "checkpoint")])
def test_training_under_exact_equals_torch(trained, modes, device):
    """On CPU bitwise (the same ops on the same inputs); on CUDA to float32 round-off (the embedding's backward
    adds atomically), with every buffer page-locked."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref, got = trained[(device, modes, "torch")], trained[(device, modes, "exact")]
    one = 4 * 48 * 32  # a float32 [48, 32] stage input (6,144 bytes)
    n = 4  # one input a block, or one per offloaded mixer (3 linear + 1 softmax; the MLPs are checkpointed)
    locked = one if device == "cpu" else 2 * 4096  # CUDA: whole pages
    for (loss_r, grads_r, pool_r), (loss_g, grads_g, pool_g) in zip(ref, got):
        assert pool_r is None
        assert grads_r.keys() == grads_g.keys()
        same = torch.equal if device == "cpu" else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        assert same(loss_r, loss_g)
        for name in grads_r:
            assert same(grads_r[name], grads_g[name]), name
        # every buffer back in the pool after the backward, the same n buffers both steps (a field at a time, so
        # that a failure names the one that differs)
        registered, lent, free, pinned = pool_g
        assert registered == n * locked, f"registered bytes {registered}, expected {n} x {locked}"
        assert lent == 0, f"lent bytes {lent} after the backward"
        assert free == [(one, n)], f"free buffers by size {free}, expected {[(one, n)]}"
        assert pinned, "a free buffer is not pinned"


def test_pinned_pool_on_cuda_gives_pinned_buffers_and_asynchronous_copies():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pool = PinnedPool.for_device(torch.device("cuda"))
    shape = (3, 1000, 7)  # 84,000 bytes: not a power of two; 21 pages locked
    host = pool.allocate(torch.Size(shape), torch.float32)
    assert host.is_pinned() and pool.registered_bytes == 21 * 4096 and host.nbytes == 84000
    x = torch.randn(shape, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the copy queued behind it cannot have run when copy_ returns
        host.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    assert not done.query()  # copy_ returned before the copy ran: asynchronous
    done.synchronize()
    assert torch.equal(host, x.cpu())
    pool.release(host, done)
    again = pool.allocate(torch.Size(shape), torch.float32)
    assert again.data_ptr() == host.data_ptr() and pool.registered_bytes == 21 * 4096
    pool.release(again)
    pool.clear()
    assert pool.registered_bytes == 0
