# Mask R-CNN + ViT-Adapter-S (DeiT-S, 384-d, 12 blocks, 6 heads), 3x schedule, no token reduction.
_base_ = ["./vit-adapter-t-3x.py"]

embed_dim = 384
model = dict(
    backbone=dict(embed_dim=embed_dim, num_heads=6, drop_path_rate=0.2),
    neck=dict(in_channels=[embed_dim] * 4),
)
