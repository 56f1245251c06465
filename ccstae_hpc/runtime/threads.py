"""Torch's CPU thread count, set so that results do not depend on when threads start.

Measured with torch 2.13 (CPU wheel, MKL): the first parallel call of a vectorised
function (``torch.sqrt``, ``torch.log``) after torch's OpenMP threads are created sometimes
returns the second thread's half off by 1e-5-7e-5 (relative); about 1 process in 6, then
never again in that process.  One throw-away parallel call right after setting the thread
count absorbs it (40 of 40 processes exact after it).  Maps and models of the same store
were not reproducible between runs without it.
"""

from __future__ import annotations

import torch

# elements of the throw-away call: above torch's grain size (32768), so that it runs on
# every thread
_SETTLE_ELEMENTS = 1 << 17


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` and one throw-away parallel call on the new threads."""
    torch.set_num_threads(max(1, int(n)))
    settle_torch_threads()


def settle_torch_threads() -> None:
    """Run one parallel vectorised call (discarded) on torch's current threads."""
    if torch.get_num_threads() > 1:
        torch.sqrt(torch.ones(_SETTLE_ELEMENTS)).sum()
