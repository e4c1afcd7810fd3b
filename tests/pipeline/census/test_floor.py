"""The census's noise floor and its known answers, for each of the three readings.

Filters are read as their expected mean preferred stimulus (scale and sign from the BatchNorm),
mean stimuli against their baseline with the standard error of their count, activation-
maximization images as RGB images. Each reading must still find an oriented gray Gabor, a red
disc, a red/green centre-surround and a red/green edge, and must call a neutral patch with a
colour offset |δ| ≤ 0.005 and the mean of thousands of random natural patches 'no structure'.
"""
from __future__ import annotations

import glob

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.census.patterns import (actmax_input_patterns, mean_noise, measure_rows,
                                      properties, stimulus_filters, summarise)
from pipeline.census.types import (IMAGENET_COVARIANCE, K_SIGMA, RESOLUTION, Thresholds,
                                   classify_batch, filter_threshold, filter_to_stimulus,
                                   preferred_stimulus, selection_noise, standard_error,
                                   structure)
from pipeline.data.preprocess import IMAGENET

GRAY = np.array([0.5, 0.5, 0.5])
RED, GREEN = np.array([0.8, 0.2, 0.2]), np.array([0.2, 0.8, 0.2])
VARIANCES = np.diag(IMAGENET_COVARIANCE)
IDENTITY = {"kind": "identity"}


def grid(s):
    r, c = np.mgrid[0:s, 0:s] - (s - 1) / 2
    return c, -r


def gray_gabor(s, amplitude=0.3):
    x, y = grid(s)
    g = np.exp(-(x ** 2 + y ** 2) / (2 * (s / 5) ** 2)) * np.cos(2 * np.pi * y / (s / 2.5))
    return GRAY[:, None, None] + amplitude * g[None] * np.ones((3, 1, 1))


def disc(s, colour=RED):
    x, y = grid(s)
    inside = np.hypot(x, y) < s / 4
    return np.where(inside[None], colour[:, None, None], GRAY[:, None, None])


def centre_surround(s):
    """A red centre on a green surround: a balanced colour difference of Gaussians (the smooth
    double-opponent receptive field; sharp rings one pixel wide are a known limit)."""
    x, y = grid(s)
    r2 = x ** 2 + y ** 2
    sigma = s / 7
    g1, g2 = np.exp(-r2 / (2 * sigma ** 2)), np.exp(-r2 / (2 * (2.5 * sigma) ** 2))
    dog = g1 / g1.sum() - g2 / g2.sum()
    return GRAY[:, None, None] + 0.3 * (RED - GREEN)[:, None, None] * (dog / np.abs(dog).max())


def edge(s):
    x, _ = grid(s)
    return np.where((x < 0)[None], RED[:, None, None], GREEN[:, None, None])


def offset(s, delta):
    return GRAY[:, None, None] + np.asarray(delta)[:, None, None] * np.ones((3, s, s))


DELTAS = [(0.005, 0.0, 0.0), (0.0029, -0.0029, 0.0029), (-0.0035, 0.0035, 0.0), (0.001, 0, 0)]
KNOWN = [(gray_gabor, "orientation-selective", {"orientation_selective"}),
         (disc, "single-opponent", {"single_opponent"}),
         (centre_surround, "double-opponent", {"double_opponent"}),
         (edge, "double-opponent", {"double_opponent", "orientation_selective"})]
FLAGS = ("orientation_selective", "single_opponent", "double_opponent", "no_structure")


def check(cols, i, kind, flags):
    assert cols["type"][i] == kind, {k: cols[k][i] for k in ("type", "contrast", "contrast_z")}
    assert {f for f in FLAGS if cols[f][i]} == flags


# ----------------------------------------------------------------------------- the floor itself
def test_structure_is_contrast_against_resolution_and_standard_error():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3, 3, 5, 5)) * np.array([0.02, 0.003, 0.02])[:, None, None, None]
    valid = np.ones((3, 5, 5), dtype=bool)
    valid[2, 0] = False
    c = np.array([1e-6, 1e-6, 1e-1])                   # variance factors: S·c per pixel
    out = structure(d, valid, c)
    inv = np.linalg.inv(IMAGENET_COVARIANCE)
    for i in range(3):
        v = d[i][:, valid[i]]
        assert out["contrast"][i] == pytest.approx(np.sqrt((v ** 2).mean()))
        maha = np.einsum("ip,ij,jp->p", v, inv, v)      # by hand, pixel by pixel
        assert out["contrast_z"][i] == pytest.approx(np.sqrt(maha.mean() / 3 / c[i]))
        assert out["noise"][i] == pytest.approx(np.sqrt(np.trace(IMAGENET_COVARIANCE) / 3 * c[i]))
    # large contrast at small noise: structure; under one 8-bit level: none; large noise: none.
    assert out["structured"].tolist() == [True, False, False]
    assert out["contrast_z"][2] < K_SIGMA
    np.testing.assert_allclose(out["floor"], np.maximum(K_SIGMA * out["noise"], RESOLUTION))
    bare = structure(d, valid)                       # no sampling noise: the resolution alone
    assert bare["structured"].tolist() == [True, False, True] and np.isnan(bare["contrast_z"]).all()


def test_chromatic_deviations_are_judged_against_chromatic_noise():
    """A colour difference of the same RGB size is several times more significant than a
    luminance one: natural images vary far less in colour than in brightness."""
    valid = np.ones((2, 4, 4), dtype=bool)
    lum, chroma = np.ones(3) / np.sqrt(3), np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    d = np.stack([0.01 * lum[:, None, None] * np.ones((3, 4, 4)),
                  0.01 * chroma[:, None, None] * np.ones((3, 4, 4))])
    z = structure(d, valid, np.full(2, 1e-4))["contrast_z"]
    assert z[1] / z[0] > 3


def test_standard_error_of_a_subset_mean_against_its_baseline_matches_sampling():
    """n of N patches drawn at random: the difference of their mean from the mean of all N has
    the variance S·standard_error (brute force, 4000 draws)."""
    rng = np.random.default_rng(1)
    N, n = 400, 100
    pop = rng.multivariate_normal(np.zeros(3), IMAGENET_COVARIANCE, size=(N, 2, 2)).transpose(0, 3, 1, 2)
    diffs = np.stack([pop[rng.choice(N, n, replace=False)].mean(0) - pop.mean(0)
                      for _ in range(4000)])
    c = standard_error(np.full((2, 2), n), n, np.full((2, 2), N))
    np.testing.assert_allclose(c, 1 / n - 1 / N)
    # per pixel and colour: the population's variance (ddof 1, finite-population form) × c
    np.testing.assert_allclose(diffs.std(axis=0), np.sqrt(pop.var(axis=0, ddof=1) * c), rtol=0.05)
    # Overlapping patches: no more than one independent patch per image; all patches: 0.
    assert standard_error(np.full((1, 1), 5000.0), 50)[0, 0] == pytest.approx(1 / 50)
    assert (standard_error(np.full((1, 1), 400.0), 400, np.full((1, 1), 400.0)) == 0).all()


# ----------------------------------------------------------------------------- mean stimuli
def mean_reading(patterns, count=300, images=400, base=None):
    """Mean stimuli of `count` of `images` centre patches read against a baseline patch `base`
    (default: the neutral gray everywhere) of all images: measure_rows as the census runs it."""
    s = patterns[0].shape[-1]
    base = np.broadcast_to(GRAY[:, None, None], (3, s, s)) if base is None else base
    weights = [np.full(3 * s * s, float(count))] * len(patterns)
    noises = mean_noise(weights, [images] * len(patterns),
                        (np.full(3 * s * s, float(images)), images))
    rows = measure_rows("m", "conv3", "mean", range(len(patterns)), patterns,
                        [tuple(GRAY)] * len(patterns), Thresholds(), noises,
                        [base] * len(patterns))
    return {k: np.asarray(v) for k, v in rows.to_pydict().items()}


@pytest.mark.parametrize("s", [11, 27])
def test_mean_stimuli_known_answers(s):
    cols = mean_reading([make(s) for make, _, _ in KNOWN])
    for i, (_, kind, flags) in enumerate(KNOWN):
        check(cols, i, kind, flags)
    assert set(cols["reference"]) == {"baseline"}


@pytest.mark.parametrize("count", [300, 10 ** 6])
def test_mean_of_a_neutral_patch_with_a_faint_colour_offset_has_no_structure(count):
    """|δ| ≤ 0.005 is invisible (about one 8-bit level): no structure at any count; at 300 of 400
    images it is also below 4 standard errors."""
    cols = mean_reading([offset(11, d) for d in DELTAS], count=count, images=max(count, 400))
    for i in range(len(DELTAS)):
        check(cols, i, "no structure", {"no_structure"})
        assert cols["contrast"][i] < RESOLUTION


def test_the_same_pattern_is_structure_only_with_enough_images():
    """A faint Gabor (RMS contrast 0.013): noise at 30 of 400 images, oriented at 50,000 of
    500,000."""
    faint = gray_gabor(27, amplitude=0.04)
    few = mean_reading([faint], count=30, images=400)
    many = mean_reading([faint], count=50000, images=500000)
    assert few["contrast"][0] == pytest.approx(many["contrast"][0])
    assert few["type"][0] == "no structure" and few["contrast_z"][0] < K_SIGMA
    assert many["type"][0] == "orientation-selective" and many["contrast_z"][0] > K_SIGMA


def natural_patches(demo_root, size, n, rng):
    files = sorted(glob.glob(f"{demo_root}/val/*/*"))
    from PIL import Image

    imgs = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255
            for f in files]
    out = np.empty((n, 3, size, size))
    for i in range(n):
        im = imgs[rng.integers(len(imgs))]
        y, x = rng.integers(0, im.shape[1] - size + 1), rng.integers(0, im.shape[2] - size + 1)
        out[i] = im[:, y:y + size, x:x + size]
    return out


def test_means_of_random_natural_patches_have_no_structure(demo_root):
    """Real demo photographs: 100 means of 3000 random patches each, read against the mean of
    all 60,000 (the baseline) with their standard error: every one is 'no structure' (the floor's
    false-positive bound is 6e-5 per channel), and so is each against the neutral colour alone,
    while its contrast-stretched picture would show 'colour'."""
    rng = np.random.default_rng(2)
    size, n, total = 11, 3000, 60000
    pool = natural_patches(demo_root, size, total, rng)
    base = pool.mean(axis=0)
    cov = np.cov(pool.transpose(1, 0, 2, 3).reshape(3, -1))
    means = [pool[rng.choice(total, n, replace=False)].mean(axis=0) for _ in range(100)]
    weights = [np.full(3 * size * size, float(n))] * len(means)
    noises = mean_noise(weights, [n] * len(means), (np.full(3 * size * size, float(total)), total))
    neutral = tuple(base.mean(axis=(1, 2)))
    for refs in ([base] * len(means), None):
        rows = measure_rows("m", "l", "mean", range(len(means)), means, [neutral] * len(means),
                            Thresholds(), noises, refs, cov).to_pydict()
        assert set(rows["type"]) == {"no structure"}, rows["contrast_z"]
    # What the patches themselves look like: RMS deviation from their own mean colour ≈ 0.004.
    own = np.array([np.sqrt(((m - m.mean(axis=(1, 2), keepdims=True)) ** 2).mean()) for m in means])
    assert 0.0005 < np.median(own) < 0.02


# ----------------------------------------------------------------------------- filters
def filter_for(stimulus, gamma=1.0, beta=0.0):
    """Identity-preprocessed 1-channel conv weights whose stimulus-space direction S·w is
    `stimulus` − gray, and BatchNorm statistics that standardise its response."""
    d = stimulus - GRAY[:, None, None]
    w = np.einsum("ij,jhw->ihw", np.linalg.inv(IMAGENET_COVARIANCE), d)[None]
    var = float((w[0] * d).sum())                       # wᵀ S w: the response's variance
    bn = (np.array([gamma]), np.array([beta]), np.zeros(1), np.array([var]), 1e-5)
    return w, bn


def filter_reading(stimuli, **bn):
    """The census's filter reading: expected preferred stimulus, its selection noise."""
    made = [filter_for(st, **bn) for st in stimuli]
    pats = [preferred_stimulus(w, IDENTITY, b)[0] for w, b in made]
    noise = [selection_noise(filter_threshold(w, IDENTITY, b))[0] for w, b in made]
    rows = measure_rows("m", "conv1", "filter", range(len(pats)), pats, [None] * len(pats),
                        Thresholds(), noise)
    return {k: np.asarray(v) for k, v in rows.to_pydict().items()}, pats


def test_filters_known_answers_at_7_and_11_px():
    for s in (7, 11):
        cols, pats = filter_reading([make(s) for make, _, _ in KNOWN])
        for i, (make, kind, flags) in enumerate(KNOWN):
            check(cols, i, kind, flags)
            d = make(s) - GRAY[:, None, None]   # the direction is the stimulus, scale λ(0)/s
            assert np.corrcoef(pats[i].ravel(), d.ravel())[0, 1] == pytest.approx(1.0)
        assert set(cols["reference"]) == {"zero"}


def test_a_filter_that_passes_everything_prefers_nothing():
    """The same colour-offset filter: at threshold 0 it prefers a uniform red (single-opponent);
    with β = 3.3 σ its channel is on for 99.95 % of inputs and its expected mean preferred
    stimulus is an offset far below |δ| = 0.005: no structure."""
    uniform = offset(7, (0.3, -0.3, 0.0))
    on, _ = filter_reading([uniform])
    always, pats = filter_reading([uniform], beta=3.3)
    assert on["type"][0] == "single-opponent"
    assert always["type"][0] == "no structure" and np.abs(pats[0]).max() < 0.005
    faint, _ = filter_reading([offset(7, d) for d in DELTAS], beta=3.3)
    assert set(faint["type"]) == {"no structure"}


def test_a_negative_batchnorm_scale_makes_the_filter_prefer_the_opposite_stimulus():
    w, bn = filter_for(disc(7))
    pos = preferred_stimulus(w, IDENTITY, bn)
    neg = preferred_stimulus(w, IDENTITY, (-bn[0], *bn[1:]))
    np.testing.assert_allclose(neg, -pos)
    # The red disc's filter behind γ < 0 prefers a cyan disc: its red-green sign flips.
    d_pos, d_neg = pos[0][:, 3, 3], neg[0][:, 3, 3]
    assert d_pos[0] - d_pos[1] > 0 > d_neg[0] - d_neg[1]


def test_preferred_stimulus_is_the_spike_triggered_average_of_the_batchnorm_channel():
    """Gaussian pixels with ImageNet's colour covariance through a filter, a BatchNorm whose
    running statistics are the response's (γ < 0, β > 0) and a ReLU: the mean of the inputs
    where the channel is positive, minus the mean input, is `preferred_stimulus` (brute force)."""
    rng = np.random.default_rng(3)
    k, n = 3, 200000
    w = rng.normal(size=(1, 3, k, k))
    x = rng.multivariate_normal(np.zeros(3), IMAGENET_COVARIANCE, size=(n, k, k)).transpose(0, 3, 1, 2)
    resp = np.einsum("nchw,chw->n", x, w[0]) + 0.2                 # conv bias 0.2
    gamma, beta = -1.5, 0.6
    bn = (np.array([gamma]), np.array([beta]), np.array([resp.mean()]), np.array([resp.var()]),
          1e-5)
    z = gamma * (resp - resp.mean()) / np.sqrt(resp.var() + 1e-5) + beta
    sta = x[z > 0].mean(axis=0)
    got = preferred_stimulus(w, IDENTITY, bn, bias=np.array([0.2]))[0]
    np.testing.assert_allclose(got, sta, atol=4 * np.sqrt(IMAGENET_COVARIANCE[0, 0] / (z > 0).sum()))
    assert np.corrcoef(got.ravel(), sta.ravel())[0, 1] > 0.99


def test_stimulus_filters_apply_the_batchnorm_after_the_first_conv():
    from pipeline.models.zoo import build_model

    model = build_model("resnet18", num_classes=3, width=8).eval()
    with torch.no_grad():
        model.bn1.weight[:4] *= -1
        model.bn1.running_var.uniform_(0.5, 2.0)
    name, pats, noise = stimulus_filters(model, IMAGENET.state())
    assert name == "conv1"
    np.testing.assert_allclose(noise, selection_noise(filter_threshold(w := model.conv1.weight.detach().double().numpy(), IMAGENET.state(), tuple(
        t.detach().double().numpy() for t in (model.bn1.weight, model.bn1.bias, model.bn1.running_mean,
                                              model.bn1.running_var)) + (model.bn1.eps,))))
    w = model.conv1.weight.detach().double().numpy()
    bn = model.bn1
    want = preferred_stimulus(w, IMAGENET.state(), tuple(
        t.detach().double().numpy() for t in (bn.weight, bn.bias, bn.running_mean,
                                              bn.running_var)) + (bn.eps,))
    np.testing.assert_allclose(pats, want)
    direction = filter_to_stimulus(w, IMAGENET.state())
    for c in range(8):   # the sign of γ: channels 0-3 prefer the opposite of their weights
        r = np.corrcoef(pats[c].ravel(), direction[c].ravel())[0, 1]
        assert r == pytest.approx(-1.0 if c < 4 else 1.0)


# ----------------------------------------------------------------------------- actmax images
def test_actmax_images_known_answers_through_the_inverse_preprocessing():
    """Optimised inputs (preprocessed, start 0 = the mean colour) read back as RGB against that
    start colour: the known answers, and a faint offset from the start is no structure."""
    start = np.asarray(IMAGENET.mean)
    s = 11
    images = [make(s) - GRAY[:, None, None] + start[:, None, None] for make, _, _ in KNOWN]
    images += [offset(s, d) - GRAY[:, None, None] + start[:, None, None] for d in DELTAS]
    inputs = [IMAGENET(torch.from_numpy(im)[None])[0].numpy().ravel() for im in images]
    pats, neutrals = actmax_input_patterns(range(len(images)), inputs, IMAGENET.state())
    rows = measure_rows("m", "conv3", "actmax", range(len(pats)), pats, neutrals, Thresholds())
    cols = {k: np.asarray(v) for k, v in rows.to_pydict().items()}
    for i, (_, kind, flags) in enumerate(KNOWN):
        check(cols, i, kind, flags)
    for i in range(len(KNOWN), len(images)):
        check(cols, i, "no structure", {"no_structure"})
    assert set(cols["reference"]) == {"neutral"}


# ----------------------------------------------------------------------------- flags and counts
def test_properties_are_counted_each_on_its_own_with_their_overlap():
    s = 11
    pats = [edge(s), edge(s).transpose(0, 2, 1), disc(s), gray_gabor(s), offset(s, DELTAS[0])]
    rows = measure_rows("m", "conv3", "actmax", range(5), pats, [tuple(GRAY)] * 5, Thresholds())
    assert rows.column("type").to_pylist() == [
        "double-opponent", "double-opponent", "single-opponent", "orientation-selective",
        "no structure"]
    (p,) = properties(rows).to_pylist()
    assert p == {"model": "m", "layer": "conv3", "source": "actmax", "channels": 5,
                 "structured": 4, "orientation_selective": 3, "single_opponent": 1,
                 "double_opponent": 2, "no_structure": 1, "oriented_single_opponent": 0,
                 "oriented_double_opponent": 2}
    counts = {r["type"]: r["count"] for r in summarise(rows).to_pylist()}
    assert counts["no structure"] == 1 and sum(counts.values()) == 5


def test_classify_batch_gates_every_property_on_structure():
    cols = {"osi": np.array([0.9, 0.9]), "chromatic_fraction": np.array([0.9, 0.9]),
            "double_opponent_score": np.array([0.9, 0.9]), "chromatic_balance": np.array([0.9, 0.9]),
            "energy": np.array([1.0, 1.0]), "contrast": np.array([0.1, 0.001])}
    out = classify_batch(cols, Thresholds())
    assert out["type"].tolist() == ["double-opponent", "no structure"]
    assert out["orientation_selective"].tolist() == [True, False]
    assert out["double_opponent"].tolist() == [True, False]
    assert out["no_structure"].tolist() == [False, True]


def test_the_census_reads_a_mean_table_against_its_baseline_table(tmp_path):
    """measure_chunk on real Parquet files: mean.parquet rows (a Gabor, a faint offset, the
    baseline itself) and baseline.parquet; without the baseline table the same rows are read
    against the neutral colour."""
    from pipeline.census.inputs import discover, measure_chunk, plan_chunks

    s, images = 11, 400
    stim = tmp_path / "stimuli"
    stim.mkdir()
    vignette = GRAY[:, None, None] + 0.05 * grid(s)[1][None] / s          # the null's own slope
    pats = [gray_gabor(s) - GRAY[:, None, None] + vignette, vignette + 0.002, vignette]
    rows = [dict(model="m", layer="conv3", channel=c, neuron="center", count=300, images=images,
                 size=s, mean=p.ravel().astype(np.float32).tolist(), sum=(p * 300).ravel().tolist(),
                 weight=[300.0] * (3 * s * s)) for c, p in enumerate(pats)]
    pq.write_table(pa.Table.from_pylist(rows), stim / "mean.parquet")
    found = discover([str(tmp_path)], [], [], want_mean=True)
    assert not found.baseline
    chunks = plan_chunks(found, {"mean"}, "center", "auto", {}, (0.5, 1 / 3, 0.5))
    without = measure_chunk(chunks[0]).to_pydict()
    assert set(without["reference"]) == {"neutral"}
    base = dict(model="m", layer="conv3", neuron="center", images=images, size=s,
                mean=vignette.ravel().astype(np.float32).tolist(),
                sum=(vignette * images).ravel().tolist(), weight=[float(images)] * (3 * s * s))
    pq.write_table(pa.Table.from_pylist([base]), stim / "baseline.parquet")
    found = discover([str(tmp_path)], [], [], want_mean=True)
    assert list(found.baseline.values()) == [str(stim / "baseline.parquet")]
    chunks = plan_chunks(found, {"mean"}, "center", "auto", {}, (0.5, 1 / 3, 0.5))
    got = measure_chunk(chunks[0]).to_pydict()
    assert got["type"] == ["orientation-selective", "no structure", "no structure"]
    assert set(got["reference"]) == {"baseline"}
    se = np.sqrt(VARIANCES.mean() * (1 / 300 - 1 / images))      # ImageNet's S: no checkpoint
    assert got["noise"][0] == pytest.approx(se, rel=1e-6)
    assert got["floor"][0] == pytest.approx(K_SIGMA * se, rel=1e-6)
    assert got["contrast"][2] == pytest.approx(0.0, abs=1e-7)
