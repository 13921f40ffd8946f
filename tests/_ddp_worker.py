"""A two-process gloo DDP training step on a patched tiny ViT (run by ``torch.multiprocessing``).

Each rank trains on different data; after one step DDP must leave identical parameters.
Rank ``r`` writes its parameters to ``<out_dir>/rank<r>.pt``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def build_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "timm":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            depth=2,
            img_size=32,
            patch_size=8,
            num_classes=10,
            drop_path_rate=0.1,
        )
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def run(rank: int, world_size: int, init_file: str, out_dir: str, family: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        import atc_patch

        model = build_model(family).train()
        atc_patch.apply_patch(model, method="atc", linkage="average", r=4, prop_attn=True)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(2, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (2,), generator=gen)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
