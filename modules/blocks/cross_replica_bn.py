"""Cross-replica batch normalisation (BigGAN, Brock et al. 2019, section 3: "cross-replica
BatchNorm"): batch statistics over the whole global batch, not each replica's share.

torch.nn.SyncBatchNorm does this on GPUs only (it refuses CPU tensors), so kiln has its own,
for every device and backend: each replica's per-channel sum, sum of squares and count are
added up by one differentiable sum over ranks (its backward sums the gradient the same way),
giving the statistics, and the gradients, of one process holding the whole batch. The layer
does no communication itself: the training code that knows the ranks (BigGAN's LightningModule)
hands it the sum. Outside training, or without a sum, it is plain BatchNorm2d (same parameters
and buffers, so checkpoints move freely between the two).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

SumOverRanks = Callable[[Tensor], Tensor]


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over ranks by `sum_over_ranks`, a
    differentiable sum of a tensor over all ranks (None: plain BatchNorm2d)."""

    sum_over_ranks: SumOverRanks | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.sum_over_ranks is not None):
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)),
                           x.new_full((1,), x.numel() / c)])
        total = self.sum_over_ranks(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean.square()).clamp_min(0)  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_cross_replica(module: nn.Module, sum_over_ranks: SumOverRanks) -> nn.Module:
    """Every BatchNorm2d in `module` made cross-replica over `sum_over_ranks`, in place, sharing
    its parameters and buffers (so optimisers and state dicts are unaffected); returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = CrossReplicaBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                                  child.track_running_stats, device="meta")
            replacement._parameters, replacement._buffers = child._parameters, child._buffers
            replacement.sum_over_ranks = sum_over_ranks
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_cross_replica(child, sum_over_ranks)
    return module
