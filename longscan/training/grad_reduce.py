"""Gradient reduction over DP × SP, overlapped with the backward.

A parameter's gradient is final once it has been accumulated for every microbatch of the step; at that moment
its all-reduce starts, in place, while the backward goes on with the layers below (the last layers finish
first). ``finish`` zero-fills and reduces the parameters this rank never used (every rank must take part),
then waits for every reduction. Nothing is copied: no flat buffer the size of all gradients is allocated,
unlike one all-reduce after the backward, and each element's sum is the same.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.distributed as dist


class GradReducer:
    """Sum ``params``' gradients over ``group`` during the backward of ``microbatches`` microbatches a step.
    ``scope`` wraps each launch (the profiler attributes the reduction to the optimizer, as before)."""

    def __init__(self, params: list[torch.nn.Parameter], group, microbatches: int,
                 scope: Callable[[], ContextManager] = contextlib.nullcontext):
        self.group, self.microbatches, self.scope = group, microbatches, scope
        self.params = list(params)
        self.hooks = [p.register_post_accumulate_grad_hook(self._accumulated) for p in self.params]
        self.active = False
        self.counts: dict[int, int] = {}
        self.works: list = []

    def start(self) -> None:
        """Before a step's backward: count accumulations from zero; reduce each gradient once it is final."""
        self.counts = {id(p): 0 for p in self.params}
        self.works = []
        self.active = True

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        if not self.active:
            return
        n = self.counts[id(p)] = self.counts[id(p)] + 1
        if n > self.microbatches:
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} received {n} gradient accumulations in a "
                               f"step of {self.microbatches} microbatches, after its reduction started")
        if n == self.microbatches:
            self._launch(p)

    def _launch(self, p: torch.nn.Parameter, scoped: bool = True) -> None:
        with self.scope() if scoped else contextlib.nullcontext():
            self.works.append(dist.all_reduce(p.grad, group=self.group, async_op=True))

    def finish(self) -> None:
        """After the backward (inside the caller's optimizer scope): reduce what was not reduced yet, then wait
        for every reduction."""
        self.active = False
        for p in self.params:
            if self.counts.get(id(p), 0) == self.microbatches:
                continue
            if self.counts.get(id(p), 0):
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} received {self.counts[id(p)]} of "
                                   f"{self.microbatches} gradient accumulations this step")
            if p.grad is None:   # unused on this rank: it still takes part in the collective
                p.grad = torch.zeros_like(p)
            self._launch(p, scoped=False)
        for work in self.works:
            work.wait()
        self.works = []

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
