"""Sparse kernels for the k-SAE: a TopK encoder whose backward only touches active latents.

Why: with plain autograd the TopK's gradient is scattered into a dense
N × n_latents matrix and pushed back through two dense matmuls (grad wrt the
input and wrt ``W_enc``), which costs twice the forward matmul although only
k of the n_latents entries per sample are non-zero. Here the backward gathers
the k active encoder rows per sample (``embedding_bag``) for the input
gradient and sums the inputs of the samples that activated each latent (again
``embedding_bag``, with samples grouped by latent) for the weight gradient, so
backward costs O(N · k · d) instead of O(N · n_latents · d). The same trick,
with the decoder rows, gives the sparse decoder: :func:`sparse_decode`.

The optional auxiliary ("AuxK") code of OpenAI's TopK paper is the top
``k_aux`` pre-activations among dead latents; it shares the forward matmul
and the sparse backward. Dead latents are given either as ids (reads only
their columns) or as a boolean mask (no host sync: the trainer refreshes the
dead set every step from a device-side counter).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["sparse_decode", "topk_encode", "TopKEncode"]


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_j values[i, j] · weight[indices[i, j]] for every row i, without a dense code.

    ``values``/``indices``: ``...×k``; ``weight``: n_latents × d. Returns ``...×d``
    in ``values``' dtype. ``embedding_bag`` gathers only the k decoder rows per
    sample, and its backward scatters only into those rows.
    """
    lead = values.shape[:-1]
    k = values.shape[-1]
    flat_v = values.reshape(-1, k)
    flat_i = indices.reshape(-1, k)
    out = F.embedding_bag(flat_i, weight.to(flat_v.dtype), mode="sum", per_sample_weights=flat_v)
    return out.reshape(*lead, weight.shape[1])


def _latent_grad(
    sample_x: torch.Tensor, flat_idx: torch.Tensor, flat_grad: torch.Tensor, k_total: int, n_latents: int
) -> torch.Tensor:
    """grad_W[j] = Σ_{(i, slot): idx[i, slot] = j} g[i, slot] · x[i], as one embedding_bag.

    Entries are sorted by latent so each latent is one "bag" over sample rows;
    bag offsets come from a per-latent count, so there is no host sync.
    """
    order = torch.argsort(flat_idx)
    samples = torch.div(order, k_total, rounding_mode="floor")
    # scatter_add, not bincount: bincount syncs with the host on CUDA to size its output
    counts = torch.zeros(n_latents, dtype=torch.long, device=flat_idx.device)
    counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(
        samples, sample_x, offsets, mode="sum", per_sample_weights=flat_grad[order].to(sample_x.dtype)
    )


class TopKEncode(torch.autograd.Function):
    """(x_centred, W_enc, b_enc) → top-k (and optional aux top-k) codes with a sparse backward.

    Forward: ``pre = x W_encᵀ + b_enc`` (dense matmul in ``compute_dtype``), then
    ``topk``; ReLU applied to the selected values when ``relu``. Outputs are
    ``(values, indices, aux_values, aux_indices)``. The aux pair is the top
    ``k_aux`` pre-activations among the latents ``aux_ids`` (the dead ones),
    read from the same pre-activations; it is empty (N×0) when ``aux_ids`` is
    None. Gradients flow to x, W_enc and b_enc only at the selected (sample,
    latent) pairs, which is exactly what autograd computes through the dense path.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        k: int,
        relu: bool,
        aux_ids: Optional[torch.Tensor],
        k_aux: int,
        compute_dtype: Optional[torch.dtype],
        aux_mask: Optional[torch.Tensor] = None,
        batch_topk: bool = False,
    ):
        cd = compute_dtype or x.dtype
        xc = x.to(cd)
        pre = F.linear(xc, weight.to(cd), bias.to(cd))
        if batch_topk:
            vals, idx = _batch_topk(pre, k)
        else:
            vals, idx = pre.topk(k, dim=-1, sorted=False)
        aux_keep = None
        if aux_mask is not None and k_aux > 0:
            # every latent's column, alive ones pushed to -inf: no host sync to list the dead ones.
            # When fewer than k_aux are dead, alive latents fill the slots; they get value 0 and no gradient.
            aux_vals, aux_idx = pre.masked_fill(~aux_mask, float("-inf")).topk(
                min(k_aux, pre.shape[-1]), dim=-1, sorted=False)
            aux_keep = aux_mask[aux_idx]
            aux_vals = torch.where(aux_keep, aux_vals, torch.zeros((), dtype=aux_vals.dtype, device=aux_vals.device))
        elif aux_ids is not None and k_aux > 0 and aux_ids.numel() > 0:
            # only the dead columns: cheaper than masking all n_latents when few are dead
            aux_vals, j = pre.index_select(1, aux_ids).topk(min(k_aux, aux_ids.numel()), dim=-1, sorted=False)
            aux_idx = aux_ids[j]
        else:
            aux_vals = vals.new_zeros(vals.shape[0], 0)
            aux_idx = idx.new_zeros(idx.shape[0], 0)
        if relu:
            vals = vals.clamp_min(0)
            aux_vals = aux_vals.clamp_min(0)
        all_idx = torch.cat([idx, aux_idx], dim=-1)
        if relu:
            live = torch.cat([vals, aux_vals], dim=-1) > 0
        elif aux_keep is not None:
            live = torch.cat([torch.ones_like(idx, dtype=torch.bool), aux_keep], dim=-1)
        else:
            live = torch.empty(0)
        ctx.save_for_backward(xc, weight, all_idx, live)
        ctx.relu = relu
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.widths = (vals.shape[-1], aux_vals.shape[-1])
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, g_idx, g_aux, g_aux_idx):  # type: ignore[override]
        xc, weight, all_idx, live = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        n = all_idx.shape[0]
        if g_vals is None:
            g_vals = torch.zeros(n, ctx.widths[0], dtype=xc.dtype, device=xc.device)
        if g_aux is None:
            g_aux = torch.zeros(n, ctx.widths[1], dtype=g_vals.dtype, device=xc.device)
        g = torch.cat([g_vals, g_aux], dim=-1)
        if live.numel():
            g = g * live
        n_latents, k_total = weight.shape[0], all_idx.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(all_idx, weight.to(xc.dtype), mode="sum", per_sample_weights=g.to(xc.dtype))
            grad_x = grad_x.to(x_dtype)
        flat_idx = all_idx.reshape(-1)
        flat_g = g.reshape(-1)
        if ctx.needs_input_grad[1]:
            grad_w = _latent_grad(xc, flat_idx, flat_g, k_total, n_latents).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n_latents, dtype=torch.float32, device=flat_g.device)
            grad_b.index_add_(0, flat_idx, flat_g.float())
            grad_b = grad_b.to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK selection: the k·N largest ReLU'd pre-activations of the whole N-row batch.

    Returned per row as ``(values, indices)`` of width = the most any row received;
    slots of rows that received fewer hold 0 (and get no gradient, as ReLU zeros).
    Reading that width is one host sync per step, the price of a ragged selection.
    """
    n = pre.shape[0]
    total = min(k * n, pre.numel())
    tau = pre.reshape(-1).topk(total, sorted=False).values.min().clamp_min(0)
    width = int((pre >= tau).sum(1).max().clamp_min(1))
    vals, idx = pre.topk(min(width, pre.shape[-1]), dim=-1, sorted=False)
    keep = (vals >= tau) & (vals > 0)
    return torch.where(keep, vals, torch.zeros((), dtype=vals.dtype, device=vals.device)), idx


def topk_encode(
    x_centred: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    *,
    relu: bool = True,
    aux_ids: Optional[torch.Tensor] = None,
    k_aux: int = 0,
    compute_dtype: Optional[torch.dtype] = None,
    aux_mask: Optional[torch.Tensor] = None,
    batch_topk: bool = False,
):
    """Functional entry point of :class:`TopKEncode` (see there).

    ``aux_mask`` (bool, n_latents) marks the dead latents without a host sync;
    it takes precedence over ``aux_ids``. ``batch_topk`` selects the k·N largest
    ReLU'd pre-activations of the batch instead of k per row (BatchTopK; needs ``relu``).
    """
    if batch_topk and not relu:
        raise ValueError("batch_topk selects ReLU'd pre-activations; pass relu=True")
    return TopKEncode.apply(x_centred, weight, bias, k, relu, aux_ids, k_aux, compute_dtype, aux_mask, batch_topk)
