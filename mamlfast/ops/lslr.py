"""The LSLR update of every adapted parameter of every task in one op.

All adapted tensors of B tasks live in one flat buffer [B, P]; ``segment_ids`` [P] says
which parameter tensor each column belongs to, and ``lrs`` [T] holds the current inner
step's learning rate of each of the T tensors:

    out[b, p] = params[b, p] - lrs[segment_ids[p]] * grads[b, p]

differentiable in ``params``, ``grads`` and ``lrs``.
"""

from __future__ import annotations

import torch

from .backends import resolve


def lslr_update(
    params: torch.Tensor,
    grads: torch.Tensor,
    lrs: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One gradient step of ``params`` [B, P] with a learning rate per parameter tensor."""
    _check_shapes(params, grads, lrs, segment_ids)
    implementation = _IMPLEMENTATIONS[resolve(backend, params.device)]
    return implementation(params, grads, lrs, segment_ids)


def segment_ids_for(sizes: list[int], device: torch.device | None = None) -> torch.Tensor:
    """[P] index of the tensor each column belongs to, for tensors of ``sizes`` laid end to end."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


def _check_shapes(params, grads, lrs, segment_ids) -> None:
    if params.dim() != 2 or grads.shape != params.shape:
        raise ValueError(f"params and grads must both be [B, P], got {tuple(params.shape)} and {tuple(grads.shape)}")
    if lrs.dim() != 1:
        raise ValueError(f"lrs must be [T], got {tuple(lrs.shape)}")
    if segment_ids.shape != (params.shape[1],) or segment_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"segment_ids must be an integer tensor [P]=[{params.shape[1]}], "
                         f"got {segment_ids.dtype} {tuple(segment_ids.shape)}")


def _torch_lslr_update(params, grads, lrs, segment_ids):
    return params - lrs[segment_ids] * grads


_IMPLEMENTATIONS = {"torch": _torch_lslr_update}
