"""Cross-replica batch normalisation (BigGAN, Brock et al. 2019, section 3: "cross-replica
BatchNorm"): batch statistics over the whole global batch, not each replica's share.

torch.nn.SyncBatchNorm does this on GPUs only (it refuses CPU tensors), so kiln has its own,
for every device and backend: each replica's per-channel sum, sum of squares and count are
added up by one differentiable all-reduce (its backward all-reduces the gradient the same way),
giving the statistics, and the gradients, of one process holding the whole batch. Outside
training, or in a single process, it is plain BatchNorm2d (same parameters and buffers, so
checkpoints move freely between the two).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)),
                           x.new_full((1,), x.numel() / c)])
        total = all_reduce(local)  # differentiable sum over ranks
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


def convert_cross_replica(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in `module` made cross-replica, in place, sharing its parameters and
    buffers (so optimisers and state dicts are unaffected); returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = CrossReplicaBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                                  child.track_running_stats, device="meta")
            replacement._parameters, replacement._buffers = child._parameters, child._buffers
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_cross_replica(child)
    return module
