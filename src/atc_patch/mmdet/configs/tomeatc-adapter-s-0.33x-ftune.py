# Mask R-CNN + ViT-Adapter-S with token reduction, 0.33x fine-tuning of a trained
# vit-adapter-s-3x.py model (the ATC paper's tomeatc-adapter-s-0.33x-ftune.py for mmdet 3).
_base_ = ["./tomeatc-adapter-t-0.5x-ftune.py"]

embed_dim = 384
model = dict(
    backbone=dict(embed_dim=embed_dim, num_heads=6, drop_path_rate=0.2),
    neck=dict(in_channels=[embed_dim] * 4),
)

max_epochs = 4
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1),
]
load_from = None
