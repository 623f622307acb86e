"""Balanced slicing of a flat buffer into one slice per node (BigDL's parameter split)."""

from __future__ import annotations

import operator


def _index(x: object, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def slice_bounds(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``parts`` contiguous ``(start, stop)`` slices, in order.

    With ``align == 1`` this is BigDL's split: every slice has ``n // parts`` elements and the
    first ``n % parts`` get one more.  With ``align > 1`` the same balancing is done in units of
    ``align`` elements, so every slice starts on a multiple of ``align``, and the last slice also
    takes the ``n % align`` leftover elements.  Slices may be empty when there are fewer
    elements (units) than parts.  Raises ``TypeError`` for non-integers and ``ValueError`` for
    ``n < 0``, ``parts < 1`` or ``align < 1``.
    """
    n = _index(n, "n")
    parts = _index(parts, "parts")
    align = _index(align, "align")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    units, rest = divmod(n, align)
    size, extra = divmod(units, parts)
    bounds = []
    for j in range(parts):
        start = (j * size + min(j, extra)) * align
        stop = start + (size + (j < extra)) * align
        bounds.append((start, stop))
    last_start, last_stop = bounds[-1]
    bounds[-1] = (last_start, last_stop + rest)
    return bounds
