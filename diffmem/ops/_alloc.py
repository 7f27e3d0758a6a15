"""Output allocation for the backends, with a poisoning switch for the tests.

Backends allocate every output through ``new_output``. Inside ``poisoned_outputs()`` the new
tensors are filled with NaN (floating) or a huge sentinel (integer), so any element a kernel
forgets to write makes the result wrong instead of silently holding zeros.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def new_output(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if getattr(_state, "poison", False):
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).max)
    return out


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every output allocated by a backend with NaN (or INT_MAX) before the kernel runs."""
    previous = getattr(_state, "poison", False)
    _state.poison = True
    try:
        yield
    finally:
        _state.poison = previous
