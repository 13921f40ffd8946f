"""FID arithmetic (against scipy.linalg.sqrtm) and the FID tool's offline behaviour."""

from __future__ import annotations

import importlib.util
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

from atc_patch.train.fid import feature_statistics, fid_from_features, frechet_distance

ROOT = Path(__file__).resolve().parents[2]


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with a general matrix square root (pytorch-fid's approach)."""
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(rng, n: int, dim: int):
    feats = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return feature_statistics(feats)


@pytest.mark.parametrize("n,dim", [(200, 8), (500, 32), (64, 16)])
def test_frechet_matches_scipy_sqrtm(n, dim):
    rng = np.random.default_rng(n + dim)
    (mu1, s1), (mu2, s2) = random_stats(rng, n, dim), random_stats(rng, n, dim)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-7, abs=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)  # symmetric


def test_frechet_rank_deficient_and_identical():
    rng = np.random.default_rng(0)
    mu, s = random_stats(rng, 10, 24)  # 10 samples in 24-d: singular covariance
    mu2, s2 = random_stats(rng, 12, 24)
    scale = np.trace(s) + np.trace(s2)  # sqrt of round-off eigenvalues ~ 1e-8 of the traces
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-7 * scale)
    ref = scipy_frechet(mu, s, mu2, s2)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(ref, abs=1e-7 * scale)


def test_frechet_closed_form_1d_and_diagonal():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # diagonal: sum of the 1-D terms
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    got = frechet_distance(np.zeros(3), np.diag(v1), np.ones(3), np.diag(v2))
    assert got == pytest.approx(3 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        feature_statistics(np.zeros((1, 4)))


def test_matches_clean_fid_arithmetic():
    from cleanfid import fid as cfid

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) * 1.3 + 0.2
    mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    assert fid_from_features(a, b) == pytest.approx(
        cfid.frechet_distance(mu1, s1, mu2, s2), rel=1e-6
    )


# ---------------------------------------------------------------------------------------------
# benchmarks/fid.py
# ---------------------------------------------------------------------------------------------
def load_tool():
    spec = importlib.util.spec_from_file_location("fid_tool", ROOT / "benchmarks" / "fid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_images(folder: Path, count: int, size=(40, 30), seed=0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.jpg")


def test_build_reference_set(tmp_path):
    import PIL  # noqa: F401

    tool = load_tool()
    src = tmp_path / "imagenet"
    for k, cls in enumerate(["n01440764", "n01443537", "n99999999"]):
        write_images(src / cls, 3, size=(40 + k, 30), seed=k)
    names = tmp_path / "names.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    out = tmp_path / "ref"
    tool.main(["build-ref", "--src_dir", str(src), "--out_dir", str(out), "--per_class", "2",
               "--size", "32", "--class_names", str(names)])  # fmt: skip
    from PIL import Image

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6
    assert all(Image.open(p).size == (32, 32) for p in pngs)
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert prompts[0] == "A high quality photograph of a tench."
    assert prompts[2] == "A high quality photograph of a goldfish."
    assert prompts[4] == "A high quality photograph of a n99999999."
    # seeded: the same images again
    again = tmp_path / "ref2"
    tool.main(["build-ref", "--src_dir", str(src), "--out_dir", str(again), "--per_class", "2",
               "--size", "32"])  # fmt: skip
    assert [p.read_bytes() for p in pngs] == [p.read_bytes() for p in sorted(again.glob("*.png"))]


def test_offline_missing_inception_weights_give_a_clear_message(tmp_path, monkeypatch):
    import cleanfid  # noqa: F401

    tool = load_tool()
    if (tool.inception_dir() / tool.INCEPTION_FILE).exists():
        pytest.skip("Inception weights are present: nothing to test offline")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    write_images(tmp_path / "gen", 2)
    write_images(tmp_path / "ref", 2, seed=1)
    with pytest.raises(SystemExit) as exc:
        tool.main(["compute", "--gen_dir", str(tmp_path / "gen"), "--ref_dir",
                   str(tmp_path / "ref"), "--mode", "clean"])  # fmt: skip
    message = str(exc.value)
    assert tool.INCEPTION_URL in message and "Offline?" in message
    assert not (tool.inception_dir() / tool.INCEPTION_FILE).exists()
