"""make_visualization: clusters drawn over the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from atc_patch.vis import make_visualization


def _source(labels: list[int], prefix: int) -> torch.Tensor:
    """``(1, prefix + K, prefix + N)`` source map: prefix tokens alone, patch i in labels[i]."""
    k, n = max(labels) + 1, len(labels)
    src = torch.zeros(1, prefix + k, prefix + n)
    src[0, :prefix, :prefix] = torch.eye(prefix)
    src[0, prefix + torch.tensor(labels), prefix + torch.arange(n)] = 1
    return src


def _image(h: int = 16, w: int = 16) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (200, 0, 0)  # left half red
    arr[:, w // 2 :] = (0, 0, 200)  # right half blue
    return Image.fromarray(arr)


@pytest.mark.parametrize("prefix, class_token", [(1, True), (0, False), (5, 5)])
def test_clusters_are_filled_with_their_mean_colour(prefix, class_token):
    # 2x2 patches of 8 px: the left column is one cluster, the right column another.
    source = _source([0, 1, 0, 1], prefix)
    out = make_visualization(_image(), source, patch_size=8, class_token=class_token)
    assert isinstance(out, Image.Image) and out.size == (16, 16) and out.mode == "RGB"
    arr = np.asarray(out)
    assert tuple(arr[4, 3]) == (200, 0, 0)  # interior of the left cluster
    assert tuple(arr[10, 12]) == (0, 0, 200)
    assert tuple(arr[4, 7]) != (200, 0, 0)  # outline at the cluster border


def test_merged_cluster_gets_the_average_and_no_inner_outline():
    source = _source([0, 0, 0, 0], prefix=1)  # everything in one cluster
    arr = np.asarray(make_visualization(_image(), source, patch_size=8))
    assert tuple(arr[8, 8]) == (100, 0, 100)
    assert tuple(arr[4, 7]) == (100, 0, 100)  # no edge between patches of one cluster


def test_batched_source_of_several_images_is_rejected():
    source = torch.cat([_source([0, 1, 0, 1], 1)] * 2)
    with pytest.raises(ValueError, match="one image"):
        make_visualization(_image(), source, patch_size=8)


def test_patch_grid_mismatch_is_explained():
    with pytest.raises(ValueError, match="patch columns"):
        make_visualization(_image(32, 32), _source([0, 1, 0, 1], 1), patch_size=8)


def test_with_a_patched_model():
    import timm

    import atc_patch
    from atc_patch.vis import last_source

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8
    ).eval()
    atc_patch.apply_patch(model, method="atc", r=5, trace_source=True)
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    out = make_visualization(np.zeros((32, 32, 3), np.uint8), last_source(model), patch_size=8)
    assert out.size == (32, 32)


# --- issue 10, item 17 ---------------------------------------------------------------------------


def test_cluster_fill_draws_a_disconnected_cluster_in_one_colour():
    # 3x3 patches of 8 px; cluster 0 is the four corners (no two touch), 1 the centre cross.
    labels = [0, 1, 0, 1, 1, 1, 0, 1, 0]
    arr = np.asarray(
        make_visualization(_image(24, 24), _source(labels, 1), patch_size=8, fill="cluster")
    )
    centres = [tuple(arr[8 * (i // 3) + 4, 8 * (i % 3) + 4]) for i in range(9)]
    assert len({centres[i] for i in (0, 2, 6, 8)}) == 1  # the corners share one colour
    assert len(set(centres)) == 2  # two clusters, two colours (the image does not show through)
    assert tuple(arr[0, 0]) == centres[0]  # no outline on the image border
    assert tuple(arr[4, 7]) == (51, 51, 51)  # dark outline where two clusters meet


def test_cluster_fill_colours_count_the_tokens_of_a_patched_model():
    import timm

    import atc_patch
    from atc_patch.vis import last_source

    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=64, patch_size=8
    ).eval()
    atc_patch.apply_patch(model, method="atc", r=25, trace_source=True)
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    source = last_source(model)
    assert source.shape[1] == 2 + 64 - 50
    vis = make_visualization(
        np.zeros((64, 64, 3), np.uint8), source, patch_size=8, class_token=2, fill="cluster"
    )
    arr = np.asarray(vis)
    centres = {tuple(arr[8 * i + 4, 8 * j + 4]) for i in range(8) for j in range(8)}
    assert len(centres) == 64 - 50


def test_prefix_mismatch_names_the_fix():
    # A distilled/register model: 2 prefix tokens, but the default class_token=True drops one.
    with pytest.raises(ValueError, match=r"pass class_token=2, i.e. class_token=model.num_pre"):
        make_visualization(_image(), _source([0, 1, 0, 1], 2), patch_size=8)
    with pytest.raises(ValueError, match="fill must be one of"):
        make_visualization(_image(), _source([0, 1, 0, 1], 1), patch_size=8, fill="solid")
