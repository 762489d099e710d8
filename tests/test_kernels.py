"""Overlap kernels: the Triton kernel (interpreter mode on CPU) gives exactly the numpy results.

No GPU is available here, so the Triton kernel runs under Triton's own
interpreter (``TRITON_INTERPRET=1``) on CPU tensors: the same kernel source,
the same program grid and masks, executed by Triton instead of a GPU.
"""

import logging
import os

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton compiles the kernel

from contextpilot_engine.kernels import (  # noqa: E402
    GpuUnavailableError,
    PackedRows,
    pack_rows,
    pair_overlap,
    pair_overlap_cpu,
    select_backend,
)


def random_rows(seed, n=120, universe=80, max_len=20):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n)
    items = np.concatenate([rng.choice(universe, size=k, replace=False) for k in lengths])
    weights = rng.integers(1, 1300, universe)
    return lengths, items, weights


def brute_force(lengths, items, weights, left, right):
    starts = np.r_[0, np.cumsum(lengths)]
    sets = [set(items[starts[i] : starts[i + 1]].tolist()) for i in range(len(lengths))]
    return np.array([sum(int(weights[t]) for t in sets[a] & sets[b]) for a, b in zip(left, right)])


def test_numpy_path_matches_brute_force():
    lengths, items, weights = random_rows(0)
    rows = pack_rows(lengths, items, weights, pow2=False)
    rng = np.random.default_rng(1)
    left, right = rng.integers(0, len(lengths), 3000), rng.integers(0, len(lengths), 3000)
    assert (pair_overlap_cpu(rows, left, right) == brute_force(lengths, items, weights, left, right)).all()


def test_sorted_and_cell_by_cell_numpy_paths_agree():
    lengths, items, weights = random_rows(5)
    rows = pack_rows(lengths, items, weights, pow2=True)
    per_cell = PackedRows(rows.ids, rows.weights)  # no item weights: the K x K comparison path
    left, right = np.arange(0, 120, 2), np.arange(1, 120, 2)
    assert (pair_overlap_cpu(rows, left, right) == pair_overlap_cpu(per_cell, left, right)).all()


def test_numpy_path_is_independent_of_padding():
    lengths, items, weights = random_rows(2)
    left, right = np.arange(60), np.arange(60, 120)
    a = pair_overlap(pack_rows(lengths, items, weights, pow2=False), left, right)
    b = pair_overlap(pack_rows(lengths, items, weights, pow2=True), left, right)
    assert (a == b).all()


@pytest.mark.triton
@pytest.mark.parametrize("seed", [0, 3, 7])
def test_triton_kernel_gives_identical_results(seed, triton_ready):
    from contextpilot_engine.kernels.overlap_triton import pair_overlap_triton

    lengths, items, weights = random_rows(seed, n=90, max_len=24)
    rows = pack_rows(lengths, items, weights, pow2=True)
    rng = np.random.default_rng(seed + 100)
    m = 500 + seed  # not a multiple of the block size: exercises the masks
    left, right = rng.integers(0, len(lengths), m), rng.integers(0, len(lengths), m)
    expected = pair_overlap_cpu(rows, left, right)
    got = pair_overlap_triton(rows, left, right, device="cpu")
    assert got.dtype == np.int64
    assert (got == expected).all()


@pytest.mark.triton
def test_batch_reorder_is_identical_on_both_backends(triton_ready):
    from contextpilot_engine.batch_reorder import plan_batch
    from contextpilot_engine.bench.workloads import rag_batch
    from contextpilot_engine.validation import parse_contexts

    wl = rag_batch(n_queries=60, top_k=8, n_chunks=120, seed=4)
    batch = parse_contexts(wl.contexts, "c", wl.token_counter(), 4096, allow_single=False)[0]
    cpu = plan_batch(batch, strategies=("merge_tree",))
    tri = plan_batch(batch, strategies=("merge_tree",), backend=select_backend(True))
    assert select_backend(True).name == "triton"
    assert cpu.orders == tri.orders and cpu.dfs_order == tri.dfs_order


def test_use_gpu_without_gpu_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING, logger="contextpilot_engine.kernels"):
        backend = select_backend(True)
    assert backend.name == "numpy"
    assert "falling back to the numpy CPU path" in caplog.text
    with pytest.raises(GpuUnavailableError, match="use_gpu=True"):
        select_backend(True, strict=True)
    assert select_backend(False).name == "numpy"
