"""Buffer reuse (``InhibitionConfig.reuse_buffers``, native kernel): the output copy and the
gradient are written into the memory of an earlier call's once nothing refers to it any
more, never while the user (or autograd) still holds that tensor or a view of it."""

from __future__ import annotations

import pytest
import torch

import memel

pytestmark = pytest.mark.usefixtures("native_kernel")


def _batches(count: int, shape: tuple[int, ...] = (4, 12, 32), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) * (1 + 0.1 * i) for i in range(count)]


def _inhibitor(mode: str = "rd", reuse: bool = True) -> memel.Inhibitor:
    strength = {"strength": 1.5} if mode == "rd" else {}
    return memel.Inhibitor(mode=mode, top_n=2, forget_steps=2, late_start=1, reuse_buffers=reuse, **strength)


def _step(
    inhibitor: memel.Inhibitor, batch: torch.Tensor, grad: torch.Tensor, keep: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training call and backward (with the l2e loss where there is one): (output, input).
    ``keep``: a hook keeps the output's gradient there (so autograd is not its only holder)."""
    z = batch.clone().requires_grad_(True)
    out = inhibitor(z)
    if keep is not None:
        out.register_hook(keep.append)
    loss = (out * grad).sum()
    extra = inhibitor.auxiliary_loss()
    (loss if extra is None else loss + extra).backward()
    return out, z


@pytest.mark.parametrize("mode", ["rd", "l2e"])
def test_results_held_by_the_caller_are_never_overwritten(mode: str) -> None:
    """Every output and gradient kept to the end equals those of a module that never reuses."""
    batches = _batches(8)
    upstream = _batches(8, seed=1)
    results = {}
    for reuse in (True, False):
        inhibitor = _inhibitor(mode, reuse)
        kept = []
        for batch, grad in zip(batches, upstream):
            out, z = _step(inhibitor, batch, grad)
            kept.append((out.detach(), z.grad))  # held: the next calls must write elsewhere
        results[reuse] = kept
    for (out_a, grad_a), (out_b, grad_b) in zip(results[True], results[False], strict=True):
        assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)
    if mode == "rd":
        assert not torch.equal(results[True][-1][0], batches[-1])  # values were inhibited


@pytest.mark.parametrize("mode", ["rd", "l2e"])
def test_buffers_are_reused_once_free_and_give_the_same_results(mode: str) -> None:
    """(The output's gradient is kept by a hook, so RD writes its gradient into the reused
    buffer instead of changing that one in place.)"""
    batches = _batches(6)
    upstream = _batches(6, seed=2)
    outputs: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    grads: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    pointers: list[tuple[int, int]] = []
    for reuse in (True, False):
        inhibitor = _inhibitor(mode, reuse)
        for batch, grad in zip(batches, upstream):
            out, z = _step(inhibitor, batch, grad, keep=[])
            outputs[reuse].append(out.detach().clone())
            grads[reuse].append(z.grad.clone())
            if reuse and inhibitor._grad_slot.tensor is not None:
                pointers.append((out.data_ptr(), inhibitor._grad_slot.tensor.data_ptr()))
            del out, z  # all released: the buffers are free for the next call
    for a, b in zip(outputs[True] + grads[True], outputs[False] + grads[False], strict=True):
        assert torch.equal(a, b)
    if mode == "l2e":  # its gradient is sparse, added into the downstream one: no buffer at all
        assert not pointers
        return
    late = pointers[1:]  # past the late start every call writes its gradient and its copy
    assert len(late) >= 3
    assert len({grad_ptr for _, grad_ptr in late}) == 1, "the gradient buffer was not reused"
    assert len({out_ptr for out_ptr, _ in late}) == 1, "the output buffer was not reused"


@pytest.mark.parametrize("strength", [1.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rd_changes_a_gradient_only_autograd_holds_in_place(strength: float, dtype: torch.dtype) -> None:
    """Behind a linear layer on the 3-D output (its gradient arrives as a view, which only
    autograd holds), RD reverses the selected values of that gradient in place, buffers
    reused or not: the input's gradient is the same memory and no buffer is written. Where a
    hook keeps that gradient it is copied instead; the values are the same bit for bit."""
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 6, 32, generator=generator).to(dtype) for _ in range(3)]
    weight = torch.randn(5, 32, generator=generator).to(dtype)
    grads = {}
    for reuse in (True, False):
        for keep in (False, True):
            inhibitor = memel.Inhibitor(mode="rd", strength=strength, top_n=2, late_start=1, reuse_buffers=reuse)
            seen: dict[str, int] = {}
            kept: list[torch.Tensor] = []
            for batch in batches:
                x = batch.clone().requires_grad_(True)
                h = torch.nn.functional.gelu(x)
                h.register_hook(lambda grad: seen.__setitem__("input", grad.data_ptr()))
                out = inhibitor(h)
                out.register_hook(kept.append if keep else lambda grad: seen.__setitem__("output", grad.data_ptr()))
                torch.nn.functional.linear(out, weight).square().sum().backward()
            grads[reuse, keep] = x.grad
            if not keep:
                assert seen["input"] == seen["output"]
                assert inhibitor._grad_slot.tensor is None  # the copy's buffer was never needed
            else:
                assert all(grad.data_ptr() != seen["input"] for grad in kept[-1:])
                assert (inhibitor._grad_slot.tensor is not None) == reuse
    reference = grads[False, True]
    assert all(torch.equal(grad, reference) for grad in grads.values())


def test_a_view_of_the_output_keeps_its_buffer_busy() -> None:
    inhibitor = _inhibitor()
    batches = _batches(5)
    for batch in batches[:3]:
        inhibitor(batch)
    first = inhibitor(batches[3])
    row = first[0]  # a view: shares the lent memory
    pointer = first.data_ptr()
    snapshot = row.clone()
    del first
    second = inhibitor(batches[4])
    assert second.data_ptr() != pointer and torch.equal(row, snapshot)
    pointer = second.data_ptr()  # the buffer offered next
    del row, second
    third = inhibitor(batches[4] * 2)
    assert third.data_ptr() == pointer  # nothing refers to it any more: reused
