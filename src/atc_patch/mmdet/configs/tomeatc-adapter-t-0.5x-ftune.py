# Mask R-CNN + ViT-Adapter-T with token reduction inside the ViT blocks, 0.5x fine-tuning of a
# trained vit-adapter-t-3x.py model. mmdet 3 counterpart of the ATC paper's
# MMDet_setup/configs/mask_rcnn/tomeatc-adapter-t-0.5x-ftune.py.
#
# Blocks 3, 6 and 9 each keep int(reduction_ratio * T) of their current T tokens (0.7 -> 70 %,
# 49 %, 34.3 % of the grid); tokens are unmerged to the full grid for every injector, extractor
# and for the output maps. Change the method from the command line, e.g.
#   --cfg-options model.backbone.linkage=single model.backbone.reduction_ratio=0.25
#   --cfg-options model.backbone.method=tome model.backbone.linkage=None
_base_ = ["./vit-adapter-t-3x.py"]

model = dict(
    backbone=dict(
        method="atc",  # 'atc' | 'tome'
        linkage="average",  # 'single' | 'complete' | 'average' (None for 'tome')
        reduction_loc=[3, 6, 9],
        reduction_ratio=0.7,  # fraction of the current tokens kept at each location
        proportional_attn=True,
        # int(ratio * T) of the T tokens each location gets, also after a ToMe step that could
        # not remove enough (ToMe removes at most half): the reference's rule
        keep_rate_mode="reference",
    )
)

optim_wrapper = dict(optimizer=dict(lr=0.00001, weight_decay=0.000001))
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[4, 5], gamma=0.1),
]
train_dataloader = dict(batch_size=4)
# The trained vit-adapter-t-3x.py checkpoint to fine-tune (never downloaded by atc_patch).
load_from = None
