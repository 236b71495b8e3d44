"""longscan.kernels.saved: a forward's value for its backward, taken apart into tensors and rebuilt."""
import dataclasses

import torch

from longscan.kernels import saved


@dataclasses.dataclass
class Inner:
    a: torch.Tensor | None
    b: torch.Tensor


@dataclasses.dataclass
class Outer:
    seg: int
    x: torch.Tensor | None
    inner: Inner | None = None


def test_round_trip_through_nested_dataclasses():
    value = Outer(7, torch.randn(3), Inner(None, torch.randn(2, 2)))
    tensors, skeleton = saved.pack(value)
    assert len(tensors) == 2 and tensors[0] is value.x and tensors[1] is value.inner.b
    assert not any(isinstance(t, torch.Tensor) for t in (skeleton.x, skeleton.inner.b))   # the skeleton holds none
    back = saved.unpack([t.clone() for t in tensors], skeleton)
    assert back.seg == 7 and back.inner.a is None
    assert torch.equal(back.x, value.x) and torch.equal(back.inner.b, value.inner.b)


def test_none_and_a_bare_tensor():
    assert saved.pack(None) == ([], None) and saved.unpack([], None) is None
    t = torch.randn(4)
    tensors, skeleton = saved.pack(t)
    assert len(tensors) == 1 and tensors[0] is t and saved.unpack(tensors, skeleton) is t
