"""How a pass cuts its texts into batches: longest first, so a batch pads little, and, for an
expert pass over queries routed to several experts, where each expert gets batches of its own.

A batch may mix experts: it runs on the shared base weights with each row's own LoRA term
added per targeted layer (:class:`routerretriever.lora.RowLoRA`). Those terms are a few small
kernels per layer and expert: on a CPU, next to nothing against MiniLM's matmuls, so mixed
batches keep the pass at the plain pass's batch count; where a pass is itself a few cheap
kernels, as on a GPU, they cost a third of a pass or more (``benchmarks/mixed_batches.py``:
0.66 of a plain pass with mixed batches, 0.94 with one expert per batch). So on a GPU, an
expert's queries fill batches of their own (merged weights: a plain pass), and only the
leftovers share mixed batches.

    >>> plan_batches(ids, order, names, 32, "cuda")   # lists of row indices, one per batch
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["BY_EXPERT", "length_batches", "expert_batches", "plan_batches"]


def length_batches(ids: Sequence[Sequence[int]], order: list[int], size: int) -> list[list[int]]:
    """Cut rows sorted longest first into batches of at most ``size``, also closing a batch
    before a text half as long as its longest: padding it would waste over half the batch."""
    out: list[list[int]] = []
    start = 0
    while start < len(order):
        longest, end = len(ids[order[start]]), start + 1
        while end < len(order) and end - start < size and 2 * len(ids[order[end]]) > longest:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def expert_batches(
    ids: Sequence[Sequence[int]], order: list[int], names: Sequence[str | None], size: int
) -> list[list[int]]:
    """:func:`length_batches`, one expert to a batch where its rows fill whole batches; the
    rows left over share mixed batches, so a few queries still take one pass."""
    if len({names[i] for i in order}) <= 1:
        return length_batches(ids, order, size)
    out: list[list[int]] = []
    rest: list[int] = []
    for name in dict.fromkeys(names[i] for i in order):  # each expert, longest text first
        for batch in length_batches(ids, [i for i in order if names[i] == name], size):
            if len(batch) == size:
                out.append(batch)
            else:
                rest.extend(batch)
    rest.sort(key=lambda i: -len(ids[i]))
    return out + length_batches(ids, rest, size)


def _mixed(
    ids: Sequence[Sequence[int]], order: list[int], names: Sequence[str | None], size: int
) -> list[list[int]]:
    return length_batches(ids, order, size)


Plan = Callable[[Sequence[Sequence[int]], list[int], Sequence[str | None], int], list[list[int]]]

#: per torch device type, how an expert pass cuts its batches (others: mixed, by length only)
BY_EXPERT: dict[str, Plan] = {"cuda": expert_batches}


def plan_batches(
    ids: Sequence[Sequence[int]],
    order: list[int],
    names: Sequence[str | None],
    size: int,
    device_type: str = "cpu",
) -> list[list[int]]:
    """The batches of a pass on ``device_type`` (module docstring); ``names[i]`` is row ``i``'s
    expert (``None``: the base model), ``order`` the rows longest first."""
    return BY_EXPERT.get(device_type, _mixed)(ids, order, names, size)
