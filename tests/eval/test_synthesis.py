"""Synthesis metrics against hand-worked values: Fréchet distance, SSIM, diversity, consistency, regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medunifier.eval.finding_classifier import SmallCNN, consistency, train_cnn_classifier
from medunifier.eval.image_metrics import (
    InceptionFeatures,
    feature_fid,
    frechet_distance,
    masked_ssim,
    pairwise_diversity,
    ssim_map,
)
from medunifier.eval.synthesis import finding_regions

METHODS = ["eigh", "sqrtm"]


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_of_hand_worked_gaussians(method: str) -> None:
    # 1-D: (0 - 2)^2 + 1 + 4 - 2 sqrt(1 * 4) = 5
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([2.0]), np.array([[4.0]]),
                            method=method) == pytest.approx(5.0)
    # commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2 plus the mean term
    mu1, mu2 = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(5.0 + (1 - 3) ** 2 + (2 - 1) ** 2)
    # a rotated copy of a covariance: same eigenvalues, d = tr(A) + tr(B) - 2 tr((A B)^1/2) computed by hand
    a = np.array([[2.0, 1.0], [1.0, 2.0]])  # eigenvalues 3, 1 on (1, 1) and (1, -1)
    b = np.diag([3.0, 1.0])
    # A B has trace 2*3 + 2*1 = 8 and determinant det(A) det(B) = 3 * 3 = 9: sqrt-eigenvalues l1 + l2 with
    # (l1 + l2)^2 = tr(AB) + 2 sqrt(det(AB)) = 8 + 6
    expected = 4.0 + 4.0 - 2.0 * np.sqrt(14.0)
    assert frechet_distance(np.zeros(2), a, np.zeros(2), b, method=method) == pytest.approx(expected, abs=1e-9)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Several tests here run on one thread; later test modules get the thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_fid_of_identical_sets_is_zero_and_methods_agree() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    for method in METHODS:
        assert feature_fid(x, x, method=method) == pytest.approx(0.0, abs=1e-7)
    y = rng.standard_normal((300, 16)) + 0.5
    assert feature_fid(x, y, "eigh") == pytest.approx(feature_fid(x, y, "sqrtm"), rel=1e-6)
    # two big samples of N(0, I) and N(m, I): FID ~ |m|^2 (small finite-sample bias)
    m = np.full(4, 0.5)
    a, b = rng.standard_normal((20000, 4)), rng.standard_normal((20000, 4)) + m
    assert feature_fid(a, b) == pytest.approx(1.0, abs=0.02)


def test_ssim_identity_formula_and_masking() -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    a = gaussian_filter(rng.random((48, 48)), 2)
    a = (a - a.min()) / (a.max() - a.min())
    assert np.allclose(ssim_map(a, a), 1.0)
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    # one interior pixel by the textbook formula with an explicit 11x11 Gaussian window (sigma 1.5)
    k = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    w = np.outer(k, k) / np.outer(k, k).sum()
    i, j = 20, 27
    pa, pb = a[i - 5 : i + 6, j - 5 : j + 6], b[i - 5 : i + 6, j - 5 : j + 6]
    mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
    var_a, var_b = (w * pa * pa).sum() - mu_a**2, (w * pb * pb).sum() - mu_b**2
    cov = (w * pa * pb).sum() - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    assert ssim_map(a, b)[i, j] == pytest.approx(expected, abs=1e-9)
    # a change inside the region leaves the SSIM far outside it at 1
    c = a.copy()
    c[:16, :16] = 1.0 - c[:16, :16]
    outside_far = np.ones_like(a, dtype=bool)
    outside_far[:24, :24] = False
    assert masked_ssim(c, a, outside_far) == pytest.approx(1.0, abs=1e-9)
    assert masked_ssim(c, a, ~outside_far) < 0.9
    u8 = (a * 255).astype(np.uint8)
    assert masked_ssim(u8, u8, outside_far) == pytest.approx(1.0)


def test_pairwise_diversity_and_consistency_by_hand() -> None:
    features = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [9.0, 9.0]])
    groups = np.array([0, 0, 1, 1, 1, 2])  # group 2 has one member: ignored
    # group 0: one pair at distance 5; group 1: pairs at 0, 1, 1 -> 2/3
    assert pairwise_diversity(features, groups) == pytest.approx((5.0 + 2.0 / 3.0) / 2)
    classes = ["a", "b", "c"]
    pred = np.array([0, 0, 1, 2, 2, 2])
    target = np.array([0, 1, 1, 1, 2, 2])
    c = consistency(pred, target, classes)
    assert c["per_finding"] == {"a": 1.0, "b": pytest.approx(1 / 3), "c": 1.0}
    assert c["macro"] == pytest.approx((1 + 1 / 3 + 1) / 3) and c["accuracy"] == pytest.approx(4 / 6)


def test_finding_regions_pick_where_the_means_differ() -> None:
    normal = np.zeros((32, 32))
    effusion = normal.copy()
    effusion[24:, :] = 0.5  # bottom quarter of the image
    heart = normal.copy()
    heart[12:20, 12:20] = 0.3
    regions = finding_regions({"pleural_effusion": effusion, "cardiomegaly": heart}, normal, grid=4, area=0.25)
    expected = np.zeros((4, 4), bool)
    expected[3] = True
    assert np.array_equal(regions["pleural_effusion"], expected)
    assert regions["cardiomegaly"][1:3, 1:3].all() and regions["cardiomegaly"].sum() == 4


def test_cnn_classifier_learns_a_separable_toy_task() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = (rng.random((120, 32, 32)) * 60).astype(np.uint8)
    y = np.arange(120) % 2
    x[y == 1, 8:24, 8:24] += 150  # class 1: a bright square
    clf = train_cnn_classifier(x[:100], y[:100], x[100:], y[100:], ["dark", "bright"], epochs=6, batch_size=20,
                               seed=0)
    assert (clf.predict(x[100:]) == y[100:]).mean() >= 0.9
    assert clf.features(x[:3]).shape == (3, 128) and np.allclose(clf.predict_proba(x[:3]).sum(1), 1.0)
    assert isinstance(clf.net, SmallCNN)


def test_inception_features_offline_and_grey_equals_rgb() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    grey = (rng.random((2, 32, 32)) * 255).astype(np.uint8)
    inception = InceptionFeatures(batch_size=2)
    f_grey = inception(grey)
    f_rgb = inception(np.repeat(grey[..., None], 3, -1))
    assert f_grey.shape == (2, 2048) and np.isfinite(f_grey).all()
    np.testing.assert_allclose(f_grey, f_rgb, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f_grey[0], f_grey[1])


# ------------------------------------------------------------------------ edits against ground-truth pairs


class PairSynth:
    """The Synthesizer methods `evaluate_edit_pairs` uses, on uint8-valued pixels: codes are the pixels.

    mode "oracle" turns each source into its ground-truth target (looked up by the source's bytes) inside the
    region; "identity" changes nothing."""

    def __init__(self, mode: str, size: int, targets: dict[bytes, np.ndarray] | None = None):
        from types import SimpleNamespace

        from medunifier.config import ImageConfig

        self.mode, self.targets, self.regions = mode, targets or {}, []
        self.model = SimpleNamespace(config=SimpleNamespace(image=ImageConfig(size=size, channels=1)))

    def preprocess(self, images):
        return torch.stack([torch.from_numpy(np.asarray(im, np.float32))[None] for im in images])

    def encode(self, pixels, texts=None):
        return pixels.clone(), pixels.clone()

    def edit_codes(self, top, bottom, texts, *, strength, region=None, guidance=None, steps=None, seed=0):
        self.regions.append(region)
        new = top.clone()
        if self.mode == "oracle":
            for j in range(len(top)):
                target = torch.from_numpy(self.targets[top[j, 0].numpy().astype(np.uint8).tobytes()].astype(np.float32))
                inside = torch.ones_like(target, dtype=torch.bool) if region is None else region[j]
                new[j, 0] = torch.where(inside, target, top[j, 0])
        return new, new, None, None

    def decode(self, top, bottom):
        return top

    def to_uint8(self, pixels):
        return [p[0].round().clamp(0, 255).numpy().astype(np.uint8) for p in pixels]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory: pytest.TempPathFactory):
    from medunifier.data.synthcxr import write_synthcxr

    root = tmp_path_factory.mktemp("pairs")
    write_synthcxr(root, n=60, size=32, seed=2, workers=1, per_class_5x200=0, pairs=10)
    return root / "manifest.jsonl"


def _pairs(manifest):
    from medunifier.data.manifest import load_records
    from medunifier.eval.edit import load_pairs

    edits = [r for r in load_records(manifest) if r.task == "edit" and r.split == "train"]
    return load_pairs(edits, manifest.parent, 32)


def _lookup_detector(manifest):
    """Probability 1 for a pair's added finding on exactly its target image, 0 elsewhere."""
    from medunifier.data.synthcxr import PAIR_FINDINGS
    from medunifier.eval.edit import added_finding

    records, _, targets, _ = _pairs(manifest)
    known = {t.tobytes(): added_finding(r) for r, t in zip(records, targets)}
    classes = list(PAIR_FINDINGS)

    def detect(images: np.ndarray) -> np.ndarray:
        out = np.zeros((len(images), len(classes)))
        for i, im in enumerate(images):
            if im.tobytes() in known:
                out[i, classes.index(known[im.tobytes()])] = 1.0
        return out

    return detect, classes


def test_psnr_ssim_and_added_finding_by_hand() -> None:
    from medunifier.data.manifest import Record
    from medunifier.eval.edit import added_finding, psnr_uint8, ssim_uint8
    from medunifier.utils import PSNR_CAP_DB

    a = np.full((16, 16), 100, np.uint8)
    assert psnr_uint8(a, a + 5) == pytest.approx(10 * np.log10(255**2 / 25))
    assert psnr_uint8(a, a) == PSNR_CAP_DB and ssim_uint8(a, a) == pytest.approx(1.0)
    r = Record(id="e", task="edit", labels={"edema": 1, "cardiomegaly": 1, "no_finding": 0},
               source_labels={"edema": 0, "cardiomegaly": 1, "no_finding": 0})
    assert added_finding(r) == "edema"
    assert added_finding(Record(id="f", task="edit", edit_finding={"name": "pneumothorax"})) == "pneumothorax"
    assert added_finding(Record(id="g", task="edit", labels={"edema": 1})) is None


def test_edit_pairs_oracle_and_identity_edits(pair_data) -> None:
    from medunifier.eval.edit import evaluate_edit_pairs
    from medunifier.utils import PSNR_CAP_DB

    records, sources, targets, masks = _pairs(pair_data)
    assert len(records) >= 5 and all(m is not None for m in masks)
    lookup = {s.tobytes(): t for s, t in zip(sources, targets)}
    detector = _lookup_detector(pair_data)
    quiet = {"split": "train", "detector": detector, "log": lambda _: None}

    oracle = PairSynth("oracle", 32, lookup)
    perfect = evaluate_edit_pairs(oracle, pair_data, **quiet)
    assert perfect["n"] == len(records) and perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == PSNR_CAP_DB
    assert perfect["ssim_outside"] == pytest.approx(1.0) and perfect["flips"]["flip_rate"] == 1.0
    assert perfect["flips"]["detected_on_real_targets"] == 1.0 and perfect["flips"]["detected_on_real_sources"] == 0.0
    # the oracle was handed each pair's region mask (the PNG written by the generator)
    given = torch.cat([r for r in oracle.regions])
    assert torch.equal(given, torch.from_numpy(np.stack(masks)))

    nothing = evaluate_edit_pairs(PairSynth("identity", 32), pair_data, **quiet)
    assert nothing["ssim"] == pytest.approx(nothing["ssim_source"]) and nothing["ssim"] < 0.99
    assert nothing["psnr"] == pytest.approx(nothing["psnr_source"]) and nothing["psnr"] < PSNR_CAP_DB
    # outside the region (grown by the SSIM window) source and target are the same; inside they are not
    assert nothing["ssim_outside"] == pytest.approx(1.0) and nothing["ssim_inside"] < 0.99
    assert nothing["flips"]["flip_rate"] == 0.0

    anywhere = PairSynth("oracle", 32, lookup)
    assert evaluate_edit_pairs(anywhere, pair_data, region="none", **quiet)["ssim"] == pytest.approx(1.0)
    assert all(r is None for r in anywhere.regions)

def test_edit_pairs_need_edit_records(tmp_path) -> None:
    from medunifier.data.synthcxr import write_synthcxr
    from medunifier.eval.edit import evaluate_edit_pairs

    write_synthcxr(tmp_path, n=10, size=32, seed=0, workers=1, per_class_5x200=0)
    with pytest.raises(ValueError, match=r"no edit records.*--pairs"):
        evaluate_edit_pairs(PairSynth("identity", 32), tmp_path / "manifest.jsonl", log=lambda _: None)


def test_eval_edit_cli_trains_the_classifier(pair_data, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from medunifier.cli import app
    from medunifier.generate.sampling import Synthesizer

    torch.set_num_threads(1)
    _, sources, targets, _ = _pairs(pair_data)
    lookup = {s.tobytes(): t for s, t in zip(sources, targets)}
    monkeypatch.setattr(Synthesizer, "from_run", classmethod(lambda cls, ckpt, device=None: PairSynth("oracle", 32,
                                                                                                      lookup)))
    out = tmp_path / "edit"
    result = CliRunner().invoke(app, ["eval", "edit", "--ckpt", str(tmp_path), "--data", str(pair_data), "--split",
                                      "train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == "edit" and r["ssim"] == pytest.approx(1.0) and r["classifier"]["kind"] == "cnn"
    fl = r["flips"]
    assert fl["n_scored"] == r["n"] and set(fl["classes"]) == set(r["findings"])
    # an oracle edit shows this classifier exactly what the real target shows it
    assert fl["mean_probability_edited"] == pytest.approx(fl["mean_probability_real_targets"])
    assert 0.0 <= fl["detected_on_real_targets"] <= 1.0 and "edit pairs" in result.output
    bad = CliRunner().invoke(app, ["eval", "edit", "--ckpt", str(tmp_path), "--data", str(pair_data),
                                   "--region", "box"])
    assert bad.exit_code != 0 and "--region" in bad.output
