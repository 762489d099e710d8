"""Token-weighted overlap of context pairs as a Triton kernel.

One program handles ``BLOCK_P`` pairs.  It loads the left rows as a
``BLOCK_P x K`` tile, then walks the ``K`` entries of the right rows one
column at a time, comparing each against the whole tile and adding the
weights of the matches.  ``K`` is the packed width (a power of two).  Sums are
int32 (a context has far fewer than 2**31 tokens), so results are identical
to the numpy path.

On a machine without a GPU the same kernel runs under Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, which is how the tests check it.

Importing this module needs ``torch`` and ``triton``; callers go through
:mod:`contextpilot_engine.kernels`, which imports it only when asked for the
Triton backend.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .packed import PackedRows

__all__ = ["pair_overlap_triton", "BLOCK_P"]

BLOCK_P = 64


@triton.jit
def _pair_overlap_kernel(ids_ptr, w_ptr, left_ptr, right_ptr, out_ptr, n_pairs, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n_pairs
    li = tl.load(left_ptr + offs, mask=live, other=0)
    ri = tl.load(right_ptr + offs, mask=live, other=0)
    cols = tl.arange(0, K)
    tile = li[:, None] * K + cols[None, :]
    a = tl.load(ids_ptr + tile, mask=live[:, None], other=-1)
    aw = tl.load(w_ptr + tile, mask=live[:, None], other=0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for c in tl.static_range(K):
        b = tl.load(ids_ptr + ri * K + c, mask=live, other=-1)
        match = (a == b[:, None]) & (b[:, None] >= 0)
        acc += tl.sum(tl.where(match, aw, 0), axis=1)
    tl.store(out_ptr + offs, acc, mask=live)


def pair_overlap_triton(
    rows: PackedRows, left: np.ndarray, right: np.ndarray, device: str | torch.device = "cuda"
) -> np.ndarray:
    """Overlap of each pair ``(left[m], right[m])``; runs on ``device`` (CPU only under the interpreter)."""
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    if left.shape != right.shape:
        raise ValueError(f"left and right must have the same shape, got {left.shape} and {right.shape}")
    n = len(left)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ids = torch.from_numpy(np.ascontiguousarray(rows.ids)).to(device)
    w = torch.from_numpy(np.ascontiguousarray(rows.weights)).to(device)
    lt = torch.from_numpy(left).to(device)
    rt = torch.from_numpy(right).to(device)
    out = torch.empty(n, dtype=torch.int32, device=device)
    grid = (triton.cdiv(n, BLOCK_P),)
    _pair_overlap_kernel[grid](ids, w, lt, rt, out, n, K=rows.width, BLOCK=BLOCK_P)
    return out.cpu().numpy().astype(np.int64)
