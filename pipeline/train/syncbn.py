"""BatchNorm over the whole global batch of every rank, on any device (gloo too).

    model = convert_sync_batchnorm(model, device)   # before DDP; same parameters and keys
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's images (any device, gloo too).

    torch's `nn.SyncBatchNorm` runs on GPUs only; this one all-reduces per-channel sums with the
    differentiable `torch.distributed.nn.all_reduce` (two passes: mean, then squared deviations,
    so no E[x²] − E[x]² cancellation), so forward and backward equal BatchNorm over the global
    batch. Ranks may hold different numbers of images. Same parameters and buffers as
    BatchNorm2d: state_dicts are interchangeable.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn import all_reduce

        c = x.shape[1]
        count = all_reduce(x.new_tensor([x.numel() / c]))
        n = count.clamp_min(1.0)
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Every BatchNorm2d of `model` made synchronous across ranks (in place; returns `model`).

    On CUDA torch's own `nn.SyncBatchNorm` (fused kernels); elsewhere `SyncBatchNorm` above.
    """
    if device is not None and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device
                                                                  if child.affine else "cpu")
                new.load_state_dict(child.state_dict())
                if child.affine:
                    # the same Parameter objects (as torch's convert_sync_batchnorm): an
                    # optimizer built before the conversion still updates them
                    new.weight, new.bias = child.weight, child.bias
                new.train(child.training)
                setattr(module, name, new)
            else:
                swap(child)
    swap(model)
    return model


