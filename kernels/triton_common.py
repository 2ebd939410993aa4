"""Pieces every q GEMM kernel shares: program order, the split-K range, the output store.

Imported only by ``<op>/triton_impl.py`` modules, so ``import q.kernels`` never loads Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in the Triton matmul tutorial's grouped order: GROUP_M row tiles share
    B tiles in L2 (https://triton-lang.org/main/getting-started/tutorials/
    03-matrix-multiplication.html)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices of an output tile and their in-bounds masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def load_ab_tiles(a_ptr, b_ptr, rows_a, rows_b, mask_m, mask_n, offs_k, K):
    """The A tile ``[BLOCK_M, BLOCK_K]`` and the B tile ``[BLOCK_K, BLOCK_N]``, both read
    K-contiguous (B from an ``[N, K]`` weight), zero outside the matrix."""
    mask_k = offs_k < K
    a = tl.load(a_ptr + rows_a + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                other=0.0)
    b = tl.load(b_ptr + rows_b + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :],
                other=0.0)
    return a, b


@triton.jit
def k_tile_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, pid_k):
    """[first, end) K tiles of split ``pid_k`` (all of them when SPLIT_K is 1)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    return pid_k * per_split, min(k_tiles, (pid_k + 1) * per_split)


@triton.jit
def round_bf16(v):
    """fp32 ``v`` rounded half to even to bf16 precision, still fp32, so the cast after it is
    exact: Triton 3.9's interpreter truncates its own fp32 -> bf16 cast."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def store_tile(c_ptr, y, offs_m, offs_n, mask_m, mask_n, pid_k, stride_cs, stride_cm):
    """Store an fp32 tile into split ``pid_k`` of ``c`` in ``c``'s dtype (bf16 rounded)."""
    c = c_ptr + pid_k * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if c_ptr.dtype.element_ty == tl.bfloat16:
        y = round_bf16(y)
    tl.store(c, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def split_output(split: int, m: int, n: int, out_dtype: torch.dtype, device, acc_dtype=None):
    """The output of a launch: ``[m, n]`` in ``out_dtype``, or ``[split, m, n]`` partials in
    ``acc_dtype`` (fp32 by default) that :func:`reduce_splits` sums."""
    if split == 1:
        return torch.empty((m, n), dtype=out_dtype, device=device)
    return torch.empty((split, m, n), dtype=acc_dtype or torch.float32, device=device)


def reduce_splits(out: torch.Tensor, split: int, out_dtype: torch.dtype) -> torch.Tensor:
    return out if split == 1 else out.sum(0).to(out_dtype)
