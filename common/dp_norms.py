"""Per-example gradient norms of 1-D convolutions for Opacus' ghost clipping.

Opacus clips each example's gradient to ``max_grad_norm``. Its default modes materialise every
example's gradient first: for the default head's first convolution that is 35k floats per
example and step, and most of DP-SGD's extra time. Ghost clipping (Li et al. 2022; Opacus'
``grad_sample_mode="ghost"``) needs only the norms, then one more backward pass over the loss
scaled by each example's clip factor. Opacus 1.6 ships norm samplers for Linear and Embedding;
this module registers one for Conv1d through its extension point (``register_norm_sampler``).
Layers without one (GroupNorm: a few floats per example) keep Opacus' per-example gradients.

For an example with layer input columns ``u_t`` (the receptive field at output step ``t``) and
output gradients ``g_t``, the weight gradient is ``sum_t g_t u_t^T``, so its squared norm is
``sum_{t,s} (g_t . g_s)(u_t . u_s)``: two T x T Gram matrices per example.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample


@register_norm_sampler(nn.Conv1d)
def conv1d_norm_sample(layer: nn.Conv1d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of ``layer``'s weight and bias, ``(batch,)`` each."""
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        # Not the default head's layers: Opacus' per-example gradients, then their norms.
        grads = compute_conv_grad_sample(layer, activations, backprops)
        return {p: g.reshape(len(g), -1).norm(dim=1) for p, g in grads.items()}
    x = F.pad(activations[0].to(backprops.dtype), (layer.padding[0], layer.padding[0]))   # (n, C_in, T_in)
    n = x.shape[0]
    g = backprops.reshape(n, layer.out_channels, -1)                                      # (n, C_out, T)
    norms = {}
    if layer.weight.requires_grad:
        # u_t . u_s = sum_j x_{t*stride + j*dilation} . x_{s*stride + j*dilation}: the input's own
        # Gram matrix read at k shifted grids, without unfolding the input k times.
        inputs = torch.bmm(x.transpose(1, 2), x)                                          # (n, T_in, T_in)
        starts = torch.arange(g.shape[2], device=x.device) * layer.stride[0]
        columns = sum(inputs[:, (starts + j)[:, None], (starts + j)[None, :]]
                      for j in range(0, layer.dilation[0] * layer.kernel_size[0], layer.dilation[0]))
        gram = columns * torch.bmm(g.transpose(1, 2), g)
        norms[layer.weight] = gram.sum((1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(2).norm(dim=1)
    return norms
