"""What `longscan profile` installs for its profiled steps, and removes after them: per-(kind, layer) counters
of every collective, compute spans of every layer, and wrappers of torch.distributed for the collectives
that longscan's own code does not count (megatron's TP all-reduces and PP sends, the DP×SP gradient
reduction, the loss all-reduce).

Timing: on CPU a mark is the host clock, and a blocking wait is exposed time (gloo blocks the host). On CUDA
a mark is a CUDA event on the current stream, resolved once per step after a synchronize: a wait measured on
the compute stream is the time that stream stalled for the collective (exposed); one on a side stream (the
overlapped linear SP schedules) is time in flight that the compute stream did not wait for (hidden).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from longscan.distributed import stats

LAYER_KINDS = ("linear attention", "softmax attention", "MLP", "embedding + loss", "optimizer")


@dataclass
class CommEntry:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    time_s: float = 0.0
    exposed_s: float = 0.0


@dataclass
class ComputeEntry:
    kind: str
    span_s: float = 0.0       # wall (CPU) or compute-stream (CUDA) time inside the layer, comm included
    calls: int = 0


class Clock:
    """Host clock on CPU, CUDA events on the current stream on GPU; ``resolve`` turns pairs into seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        return (b - a) if not self.cuda else a.elapsed_time(b) / 1e3

    def on_side_stream(self) -> bool:
        return self.cuda and torch.cuda.current_stream() != torch.cuda.default_stream()


@dataclass
class _Pending:
    key: tuple
    a: object
    b: object
    hidden: bool = False


class CommRecorder:
    """A ``longscan.distributed.stats.Recorder`` keyed by (kind, layer); the layer is the innermost open span."""

    def __init__(self, device: torch.device):
        self.clock = Clock(device)
        self.comm: dict[tuple[str, str], CommEntry] = defaultdict(CommEntry)
        self.compute: dict[str, ComputeEntry] = {}
        self.scope: list[str] = []
        self._pending_comm: list[_Pending] = []
        self._pending_span: list[_Pending] = []
        self._open: dict[tuple[str, str], tuple] = {}

    @property
    def layer(self) -> str:
        return self.scope[-1] if self.scope else "step"

    # ---- stats.Recorder ------------------------------------------------------------------------------
    def on_count(self, kind: str, sent: int, recv: int) -> None:
        e = self.comm[(kind, self.layer)]
        e.calls += 1
        e.bytes_sent += sent
        e.bytes_received += recv

    @contextlib.contextmanager
    def wait_scope(self, kind: str):
        key = (kind, self.layer)
        hidden = self.clock.on_side_stream()
        with torch.profiler.record_function(f"comm:{kind}"):
            a = self.clock.mark()
            try:
                yield
            finally:
                self._pending_comm.append(_Pending(key, a, self.clock.mark(), hidden))

    # ---- layer spans -----------------------------------------------------------------------------------
    def begin(self, name: str, kind: str, phase: str) -> None:
        rf = torch.profiler.record_function(f"{phase}:{name}")
        rf.__enter__()
        self.scope.append(name)
        self.compute.setdefault(name, ComputeEntry(kind))
        self._open[(name, phase)] = (self.clock.mark(), rf)

    def end(self, name: str, phase: str) -> None:
        opened = self._open.pop((name, phase), None)
        if opened is None:   # a backward hook whose forward ran before profiling started
            return
        a, rf = opened
        self._pending_span.append(_Pending((name,), a, self.clock.mark()))
        if self.scope and self.scope[-1] == name:
            self.scope.pop()
        elif name in self.scope:
            self.scope.remove(name)
        rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def phase(self, name: str):
        """A named span outside the model (the optimizer step with its gradient reduction)."""
        self.begin(name, "optimizer", "step")
        try:
            yield
        finally:
            self.end(name, "step")

    def resolve(self) -> None:
        """Turn this step's marks into seconds (on CUDA after a synchronize)."""
        if self.clock.cuda:
            torch.cuda.synchronize()
        for p in self._pending_comm:
            s = self.clock.seconds(p.a, p.b)
            e = self.comm[p.key]
            e.time_s += s
            if not p.hidden:
                e.exposed_s += s
        for p in self._pending_span:
            e = self.compute[p.key[0]]
            e.span_s += self.clock.seconds(p.a, p.b)
            e.calls += 1
        self._pending_comm.clear()
        self._pending_span.clear()

    def compute_s(self, name: str) -> float:
        """The layer's time less the exposed communication inside it."""
        exposed = sum(e.exposed_s for (k, layer), e in self.comm.items() if layer == name)
        return max(0.0, self.compute[name].span_s - exposed)


# ---- model hooks ------------------------------------------------------------------------------------------
def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _span_hooks(rec: CommRecorder, module: nn.Module, name: str, kind: str) -> list:
    """Forward span from pre-hook to hook; backward span from the output's gradient to the input's."""

    def pre(mod, args):
        rec.begin(name, kind, "forward")
        x = _first_tensor(args)
        if x is not None and x.requires_grad and torch.is_grad_enabled():
            x.register_hook(lambda g: rec.end(name, "backward"))

    def post(mod, args, out):
        rec.end(name, "forward")
        y = _first_tensor(out)
        if y is not None and y.requires_grad and torch.is_grad_enabled():
            y.register_hook(lambda g: rec.begin(name, kind, "backward"))

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def install_model_hooks(rec: CommRecorder, model: nn.Module) -> list:
    """Spans of each attention mixer and MLP, the embedding, and the head with its loss; -> hook handles."""
    handles = []
    for i, block in model.layers.items():
        kind = "linear attention" if block.kind == "L" else "softmax attention"
        handles += _span_hooks(rec, block.attn, f"layers.{i}.attn", kind)
        handles += _span_hooks(rec, block.mlp, f"layers.{i}.mlp", "MLP")
    if model.first:
        emb = model.embed

        def emb_post(mod, args, out):
            rec.end("embedding", "forward")
            if out.requires_grad:
                out.register_hook(lambda g: rec.begin("embedding", "embedding + loss", "backward"))

        handles.append(emb.register_forward_pre_hook(lambda m, a: rec.begin("embedding", "embedding + loss",
                                                                             "forward")))
        handles.append(emb.register_forward_hook(emb_post))
        handles.append(emb.weight.register_post_accumulate_grad_hook(lambda p: rec.end("embedding", "backward")))
    if model.last:
        def head_pre(mod, args):
            rec.begin("head+loss", "embedding + loss", "forward")
            x = _first_tensor(args)
            if x is not None and x.requires_grad:
                x.register_hook(lambda g: rec.end("head+loss", "backward"))

        def model_post(mod, args, out):
            rec.end("head+loss", "forward")
            if out.requires_grad:
                out.register_hook(lambda g: rec.begin("head+loss", "embedding + loss", "backward"))

        handles.append(model.norm.register_forward_pre_hook(head_pre))
        handles.append(model.register_forward_hook(model_post))
    return handles


# ---- torch.distributed wrappers -----------------------------------------------------------------------------
class _TimedWork:
    """An async op's handle whose wait() is timed as exposed time of its kind."""

    def __init__(self, work, rec: CommRecorder, kind: str):
        self._work, self._rec, self._kind = work, rec, kind

    def wait(self, *args, **kwargs):
        with self._rec.wait_scope(self._kind):
            return self._work.wait(*args, **kwargs)

    def is_completed(self):
        return self._work.is_completed()


@dataclass
class DistWrappers:
    """Replace torch.distributed's collectives by counting versions for groups longscan does not count itself.

    ``groups`` maps a name to a process group; ops on ``skip`` (the SP group: its collectives report through
    longscan.distributed.stats) are passed through untouched."""
    rec: CommRecorder
    groups: dict
    skip: object
    _saved: dict = field(default_factory=dict)

    def _name(self, group) -> str:
        for name, g in self.groups.items():
            if g is group:
                return name
        if group is None:
            return "world"
        # megatron may hand its P2P another group object over the same ranks as a named one
        ranks = dist.get_process_group_ranks(group)
        for name, g in self.groups.items():
            if g is not None and dist.get_process_group_ranks(g) == ranks:
                return name
        return "other"

    def _wrap_blocking(self, fname, bytes_fn):
        orig = getattr(dist, fname)

        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            if group is self.skip and self.skip is not None:
                return orig(*args, **kwargs)
            kind = f"{self._name(group)}_{fname}"
            sent, recv = bytes_fn(args, kwargs, dist.get_world_size(group))
            self.rec.on_count(kind, sent, recv)
            if kwargs.get("async_op"):
                return _TimedWork(orig(*args, **kwargs), self.rec, kind)
            with self.rec.wait_scope(kind):
                return orig(*args, **kwargs)
        return orig, wrapper

    def _wrap_p2p(self, fname, sending: bool):
        orig = getattr(dist, fname)

        def wrapper(*args, **kwargs):
            tensor = kwargs["tensor"] if "tensor" in kwargs else args[0]
            group = kwargs.get("group", args[2] if len(args) > 2 else None)
            if group is self.skip and self.skip is not None:
                return orig(*args, **kwargs)
            kind = f"{self._name(group)}_p2p"
            n = stats.nbytes(tensor)
            self.rec.on_count(kind, n if sending else 0, 0 if sending else n)
            work = orig(*args, **kwargs)
            return _TimedWork(work, self.rec, kind) if work is not None else work
        return orig, wrapper

    def _wrap_all_to_all(self):
        """all_to_all_single: on the SP group (Ulysses, bytes counted by longscan) timed only; elsewhere counted."""
        orig = dist.all_to_all_single

        def wrapper(output, input, *args, **kwargs):
            group = kwargs.get("group", args[2] if len(args) > 2 else None)
            if group is self.skip and self.skip is not None:
                kind = "ulysses_all_to_all"
            else:
                kind = f"{self._name(group)}_all_to_all"
                w = dist.get_world_size(group)
                b = stats.nbytes(input) * (w - 1) // w
                self.rec.on_count(kind, b, b)
            if kwargs.get("async_op"):
                return _TimedWork(orig(output, input, *args, **kwargs), self.rec, kind)
            with self.rec.wait_scope(kind):
                return orig(output, input, *args, **kwargs)
        return orig, wrapper

    def install(self) -> None:
        ring = lambda a, kw, w: (2 * (w - 1) * stats.nbytes(a[0]) // w,) * 2   # noqa: E731
        gathered = lambda a, kw, w: ((w - 1) * stats.nbytes(a[1]),) * 2        # noqa: E731
        scattered = lambda a, kw, w: ((w - 1) * stats.nbytes(a[0]),) * 2       # noqa: E731
        wrappers = {"all_reduce": self._wrap_blocking("all_reduce", ring),
                    "all_gather_into_tensor": self._wrap_blocking("all_gather_into_tensor", gathered),
                    "reduce_scatter_tensor": self._wrap_blocking("reduce_scatter_tensor", scattered),
                    "all_to_all_single": self._wrap_all_to_all(),
                    "isend": self._wrap_p2p("isend", True), "irecv": self._wrap_p2p("irecv", False)}
        for name, (orig, wrapper) in wrappers.items():
            self._saved[name] = orig
            setattr(dist, name, wrapper)
        # P2POp accepts only the real isend/irecv: hand it those (batched P2P is the SP ring's, counted already)
        real = {wrappers[n][1]: wrappers[n][0] for n in ("isend", "irecv")}
        p2pop = self._saved["P2POp"] = dist.P2POp
        setattr(dist, "P2POp", lambda op, *a, **kw: p2pop(real.get(op, op), *a, **kw))

    def remove(self) -> None:
        for name, orig in self._saved.items():
            setattr(dist, name, orig)
        self._saved.clear()


def dist_wrappers(rec: CommRecorder, trainer) -> DistWrappers:
    """The wrappers for a trainer's groups (not installed yet)."""
    from megatron.core import parallel_state as ps
    r = trainer.ranks
    groups = {"tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
              "dp_sp": r.dp_sp_group, "mp": r.mp_group}
    return DistWrappers(rec, groups, r.sp_group)


class StepObserver:
    """Everything profiling installs on a trainer: the recorder, model hooks, dist wrappers; ``close`` removes
    them all (training without it runs none of this code)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.rec = CommRecorder(trainer.device)
        self.handles = install_model_hooks(self.rec, trainer.model)
        self.wrappers = dist_wrappers(self.rec, trainer)
        self.wrappers.install()
        self.previous = stats.set_recorder(self.rec)
        trainer.observer = self

    def phase(self, name: str):
        return self.rec.phase(name)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.wrappers.remove()
        stats.set_recorder(self.previous)
        self.trainer.observer = None
