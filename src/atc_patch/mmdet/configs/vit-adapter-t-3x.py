# Mask R-CNN + ViT-Adapter-T (DeiT-T, 192-d, 12 blocks, 3 heads), 3x schedule, no token reduction.
# mmdet 3 counterpart of ViT-Adapter's mask_rcnn_deit_adapter_tiny_fpn_3x_coco.py (global
# attention in every block, as the ATC paper's vit-adapter-t-3x.py).
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["atc_patch.mmdet"], allow_failed_imports=False)

# DeiT-T ImageNet weights, e.g. dict(type='Pretrained', checkpoint='pretrained/deit_tiny.pth')
pretrained = None
embed_dim = 192
model = dict(
    backbone=dict(
        _delete_=True,
        type="ViTAdapter",
        pretrain_size=224,
        patch_size=16,
        embed_dim=embed_dim,
        depth=12,
        num_heads=3,
        mlp_ratio=4,
        drop_path_rate=0.1,
        conv_inplane=64,
        n_points=4,
        deform_num_heads=6,
        cffn_ratio=0.25,
        deform_ratio=1.0,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        norm_cfg=dict(type="SyncBN", requires_grad=True),
        # token reduction: None here; see tomeatc-adapter-t-0.5x-ftune.py
        method=None,
        init_cfg=pretrained,
    ),
    neck=dict(in_channels=[embed_dim] * 4),
)

# DETR-style multi-scale augmentation with a 1024 crop, as ViT-Adapter's 3x configs.
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [
                dict(
                    type="RandomChoiceResize",
                    scales=[
                        (480, 1333),
                        (512, 1333),
                        (544, 1333),
                        (576, 1333),
                        (608, 1333),
                        (640, 1333),
                        (672, 1333),
                        (704, 1333),
                        (736, 1333),
                        (768, 1333),
                        (800, 1333),
                    ],
                    keep_ratio=True,
                )
            ],
            [
                dict(
                    type="RandomChoiceResize",
                    scales=[(400, 1333), (500, 1333), (600, 1333)],
                    keep_ratio=True,
                ),
                dict(
                    type="RandomCrop",
                    crop_type="absolute_range",
                    crop_size=(384, 600),
                    allow_negative_crop=True,
                ),
                dict(
                    type="RandomChoiceResize",
                    scales=[
                        (480, 1333),
                        (512, 1333),
                        (544, 1333),
                        (576, 1333),
                        (608, 1333),
                        (640, 1333),
                        (672, 1333),
                        (704, 1333),
                        (736, 1333),
                        (768, 1333),
                        (800, 1333),
                    ],
                    keep_ratio=True,
                ),
            ],
        ],
    ),
    dict(
        type="RandomCrop",
        crop_type="absolute_range",
        crop_size=(1024, 1024),
        allow_negative_crop=True,
    ),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            "level_embed": dict(decay_mult=0.0),
            "pos_embed": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
            "bias": dict(decay_mult=0.0),
        }
    ),
)

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1
    ),
]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3, save_last=True))
auto_scale_lr = dict(base_batch_size=16)
