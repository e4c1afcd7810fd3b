"""Orientation and colour measures on synthetic patterns with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.census.types import (IMAGENET_COVARIANCE, OPPONENT, Measures, Thresholds, classify,
                                   coherence, colour, filter_to_rgb, filter_to_stimulus, measure,
                                   measure_batch, orientation, sign_balance, stimulus_covariance,
                                   equal_signs)
from pipeline.data.preprocess import IMAGENET, WhiteningStats

GRAY = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Screen coordinates: x to the right, y up, origin at the pattern centre."""
    r, c = np.mgrid[0:s, 0:s] - (s - 1) / 2
    return c, -r


def gabor(s: int, deg: float, period: float, sigma: float, phase: float = 0.0) -> np.ndarray:
    """Gray Gabor whose stripes run at `deg` counter-clockwise from horizontal on screen."""
    x, y = grid(s)
    t = np.radians(deg)
    across = -np.sin(t) * x + np.cos(t) * y          # distance across the stripes
    g = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2)) * np.cos(2 * np.pi * across / period + phase)
    return np.repeat((0.5 + 0.4 * g)[None], 3, axis=0)


def paint(base: np.ndarray, mask: np.ndarray, rgb) -> np.ndarray:
    out = base.copy()
    out[:, mask] = np.asarray(rgb, dtype=np.float64)[:, None]
    return out


def disc_radius(s: int) -> np.ndarray:
    x, y = grid(s)
    return np.hypot(x, y)


RED, GREEN = (0.9, 0.1, 0.1), (0.1, 0.9, 0.1)
BLUE, YELLOW = (0.1, 0.1, 0.9), (0.9, 0.9, 0.1)


def angle_diff(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


@pytest.mark.parametrize("s,period,sigma", [(32, 8.0, 6.0), (11, 4.0, 2.5), (7, 3.5, 1.8)])
@pytest.mark.parametrize("deg", [0, 30, 45, 90, 135])
def test_gabor_orientation_and_high_index(s, period, sigma, deg):
    for phase in (0.0, np.pi / 2):   # even and odd (edge-like) Gabors
        m = measure(gabor(s, deg, period, sigma, phase), GRAY)
        assert angle_diff(m.orientation_deg, deg) < 5.0, (m.orientation_deg, deg)
        assert m.osi > 0.6
        assert m.chromatic_fraction == 0.0
        assert classify(m) == "orientation-selective"


def test_orientation_convention_on_plain_gratings():
    r, c = np.mgrid[0:24, 0:24].astype(float)
    cases = {0.0: np.sin(r), 90.0: np.sin(c), 45.0: np.sin(r + c), 135.0: np.sin(r - c)}
    for deg, lum in cases.items():
        osi, got = orientation(lum[None])
        assert angle_diff(got[0], deg) < 1.0, (deg, got[0])
        assert osi[0] > 0.8


def test_isotropic_blob_has_low_index_and_no_orientation():
    for s in (7, 27):
        blob = np.exp(-disc_radius(s) ** 2 / (2 * (s / 6) ** 2))
        m = measure(np.repeat((0.5 + 0.4 * blob)[None], 3, axis=0), GRAY)
        assert m.osi < 0.05
        assert np.isnan(m.orientation_deg)
        assert classify(m) == "other"


def test_rotation_and_transpose_move_the_orientation_as_they_should():
    rng = np.random.default_rng(1)
    lum = rng.normal(size=(20, 15, 15))
    osi, deg = orientation(lum)
    osi_r, deg_r = orientation(np.rot90(lum, axes=(1, 2)))      # counter-clockwise on screen
    osi_t, deg_t = orientation(np.swapaxes(lum, 1, 2))          # mirror on the "\" diagonal
    np.testing.assert_allclose(osi_r, osi, atol=1e-9)
    np.testing.assert_allclose(osi_t, osi, atol=1e-9)
    for a, b, c in zip(deg, deg_r, deg_t):
        assert angle_diff(b, a + 90.0) < 1e-6
        assert angle_diff(c, 90.0 - a) < 1e-6


def test_osi_equals_brute_force_dtft():
    rng = np.random.default_rng(2)
    s, n = 5, 64
    lum = rng.normal(size=(s, s))
    window = np.hanning(s + 2)[1:-1]
    window = window[:, None] * window[None, :]
    sig = (lum - (window * lum).sum() / window.sum()) * window
    rows, cols = np.mgrid[0:s, 0:s]
    z = total = 0.0
    for ky in range(n):
        for kx in range(n):
            fy, fx = (ky if ky < n // 2 else ky - n) / n, (kx if kx < n // 2 else kx - n) / n
            rad = np.hypot(fy, fx)
            if rad == 0 or rad > 0.5:
                continue
            p = abs((sig * np.exp(-2j * np.pi * (fy * rows + fx * cols))).sum()) ** 2
            total += p
            z += p * np.exp(2j * np.arctan2(-fy, fx))
    osi, deg = orientation(lum[None])
    assert osi[0] == pytest.approx(abs(z) / total, rel=1e-9)
    assert deg[0] == pytest.approx((np.degrees(np.angle(z)) / 2 + 90) % 180, abs=1e-6)


def test_red_centre_green_surround_is_double_opponent():
    s = 33
    rad = disc_radius(s)
    # Surround ring of the same area as the centre: balanced, as in V1 double-opponent cells.
    pattern = paint(paint(np.full((3, s, s), 0.5), rad < 10 * np.sqrt(2), GREEN), rad < 10, RED)
    for neutral in (GRAY, IMAGENET_MEAN):
        m = measure(pattern, neutral)
        assert m.opponent_axis == "red-green"
        assert m.chromatic_fraction > 0.8
        assert m.chromatic_balance > 0.9 and m.chromatic_coherence > 0.8
        assert m.double_opponent_score > 0.75
        assert classify(m) == "double-opponent"


def test_blue_yellow_oriented_edge_is_double_opponent_and_oriented():
    s = 32
    x, _ = grid(s)
    pattern = paint(paint(np.full((3, s, s), 0.5), x < 0, BLUE), x >= 0, YELLOW)
    m = measure(pattern, GRAY)
    assert m.opponent_axis == "blue-yellow"
    assert m.chromatic_balance == pytest.approx(1.0)
    assert m.double_opponent_score > 0.9
    assert angle_diff(m.orientation_deg, 90.0) < 5.0      # a vertical edge
    assert m.osi > 0.5
    assert classify(m) == "double-opponent"                # colour outranks orientation


def test_uniform_red_blob_is_single_opponent():
    s = 32
    pattern = paint(np.full((3, s, s), 0.5), disc_radius(s) < 7, RED)
    # The ImageNet mean as neutral leaves the gray background faintly green-blue: the dead zone
    # keeps that offset from counting as an opposite sign.
    for neutral in (GRAY, IMAGENET_MEAN):
        m = measure(pattern, neutral)
        assert m.opponent_axis == "red-green"
        assert m.double_opponent_score < 0.05
        assert classify(m) == "single-opponent"


def test_gray_patterns_have_no_chromatic_energy():
    s = 16
    x, y = grid(s)
    patterns = [np.full((3, s, s), 0.5), np.full((3, s, s), 0.8),
                np.repeat((0.5 + 0.3 * np.sin(x + y))[None], 3, axis=0)]
    for p in patterns:
        for neutral in (None, GRAY, (0.2, 0.2, 0.2)):
            m = measure(p, neutral)
            assert m.chromatic_fraction == 0.0
            assert m.opponent_axis == "none"
            assert m.double_opponent_score == 0.0


def test_chromatic_fraction_equals_energy_off_the_gray_axis():
    rng = np.random.default_rng(3)
    patterns = rng.random((6, 3, 9, 9))
    neutral = np.array([0.3, 0.4, 0.5])
    col = colour(patterns, neutral)
    fraction, energy = col["chromatic_fraction"], col["energy"]
    d = patterns - neutral[None, :, None, None]
    gray = np.ones(3) / np.sqrt(3)
    along = np.einsum("c,nchw->nhw", gray, d)
    off = d - along[:, None] * gray[None, :, None, None]
    np.testing.assert_allclose(energy, (d ** 2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(fraction, (off ** 2).sum(axis=(1, 2, 3)) / energy)
    np.testing.assert_allclose(OPPONENT @ OPPONENT.T, np.eye(3), atol=1e-12)


def test_nan_pixels_are_masked():
    s = 24
    pattern = paint(np.full((3, s, s), 0.5), disc_radius(s) < 6, RED)
    holed = pattern.copy()
    holed[:, :5, :] = np.nan             # rows that were never inside the image
    a, b = measure(pattern, GRAY), measure(holed, GRAY)
    assert b.chromatic_fraction == pytest.approx(a.chromatic_fraction)
    assert b.double_opponent_score == pytest.approx(a.double_opponent_score)
    assert b.energy == pytest.approx(a.energy)
    g = gabor(s, 30, 6.0, 5.0)
    g[:, :, :4] = np.nan
    m = measure(g, GRAY)
    assert angle_diff(m.orientation_deg, 30) < 5 and m.osi > 0.6
    empty = measure(np.full((3, s, s), np.nan), GRAY)
    assert empty.energy == 0.0 and classify(empty) == "empty"


def test_batch_equals_single_patterns():
    rng = np.random.default_rng(4)
    patterns = rng.random((5, 3, 10, 10))
    cols = measure_batch(patterns, GRAY)
    for i in range(5):
        m = measure(patterns[i], GRAY)
        assert cols["osi"][i] == pytest.approx(m.osi)
        assert cols["chromatic_fraction"][i] == pytest.approx(m.chromatic_fraction)
        assert cols["type"][i] == classify(m)


def test_classification_priority_and_thresholds():
    def m(osi, frac, score, balance=None):
        balance = score if balance is None else balance
        return Measures(osi, 0.0, frac, "red-green", score, 1.0, balance, 1.0)

    t = Thresholds(osi=0.5, chromatic=0.3, double_opponent=0.5)
    assert classify(m(0.9, 0.9, 0.9), t) == "double-opponent"
    assert classify(m(0.9, 0.9, 0.1), t) == "orientation-selective"
    assert classify(m(0.1, 0.9, 0.1), t) == "single-opponent"
    assert classify(m(0.1, 0.9, 0.1, balance=0.9), t) == "other"      # balanced, incoherent
    assert classify(m(0.9, 0.1, 0.9), t) == "orientation-selective"
    assert classify(m(0.1, 0.1, 0.9), t) == "other"
    assert classify(m(float("nan"), 0.9, 0.9), t) == "double-opponent"
    assert classify(m(0.45, 0.1, 0.0), Thresholds(osi=0.4)) == "orientation-selective"
    assert classify(Measures(0.9, 0.0, 0.9, "red-green", 0.9, 0.0, 0.9, 1.0), t) == "empty"
    for bad in ({"osi": 1.5}, {"chromatic": -0.1}, {"double_opponent": float("nan")}):
        with pytest.raises(ValueError):
            Thresholds(**bad)


@pytest.mark.parametrize("kind", ["zca", "normalize"])
def test_filter_to_rgb_acts_on_rgb_like_the_filter_on_preprocessed_input(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64)
    if kind == "zca":
        mix = torch.tensor([[1.0, 0.6, 0.2], [0.1, 1.0, 0.5], [0.3, 0.2, 1.0]], dtype=torch.float64)
        pre = WhiteningStats().update(torch.einsum("ij,njhw->nihw", mix, x)).fit()
    else:
        pre = IMAGENET
    w = torch.randn(4, 3, 7, 7, generator=g, dtype=torch.float64)
    w_rgb = torch.from_numpy(filter_to_rgb(w.numpy(), pre.state()))
    diff = F.conv2d(pre(x), w) - F.conv2d(x, w_rgb)
    # The difference is a per-channel constant (the bias shift −Σ w_rgb·μ), nothing spatial.
    const = -(w_rgb.sum(dim=(2, 3)) * torch.tensor(pre.mean, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(diff, const.view(1, 4, 1, 1).expand_as(diff))
    with pytest.raises(ValueError):
        filter_to_rgb(w.numpy(), {"kind": "bogus"})


def colour_dog(s: int, centre_sigma: float, axis=(1.0, -1.0, 0.0), amplitude: float = 0.4) -> np.ndarray:
    """A balanced chromatic difference of Gaussians (centre of one colour, surround of its
    opponent) on gray: the smooth double-opponent receptive field of V1 and of first-layer filters."""
    rad = disc_radius(s)
    g1, g2 = np.exp(-rad ** 2 / (2 * centre_sigma ** 2)), np.exp(-rad ** 2 / (2 * (2.5 * centre_sigma) ** 2))
    dog = g1 / g1.sum() - g2 / g2.sum()
    return 0.5 + amplitude * np.asarray(axis)[:, None, None] * (dog / np.abs(dog).max())[None]


def test_smooth_colour_dog_filters_are_double_opponent():
    for s, sigma in ((7, 1.0), (11, 1.5), (27, 3.0), (59, 5.0)):
        for axis in ((1.0, -1.0, 0.0), (-0.5, -0.5, 1.0)):
            m = measure(colour_dog(s, sigma, axis), GRAY)
            assert m.chromatic_balance > 0.7 and m.chromatic_coherence > 0.6, (s, m)
            assert classify(m) == "double-opponent"


def test_chromatic_white_noise_is_not_double_opponent():
    rng = np.random.default_rng(5)
    for s in (7, 27):
        cols = measure_batch(rng.random((200, 3, s, s)), GRAY)
        assert np.median(cols["chromatic_balance"]) > 0.7          # both signs everywhere...
        assert np.median(np.abs(cols["chromatic_coherence"])) < 0.1  # ...but no regions
        assert (cols["type"] == "double-opponent").mean() < 0.02
        assert (cols["type"] == "single-opponent").mean() < 0.05


def test_coherence_equals_brute_force_neighbour_sums():
    rng = np.random.default_rng(6)
    maps = rng.normal(size=(3, 5, 6))
    for c, got in zip(maps, coherence(maps)):
        num = den = 0.0
        for y in range(5):
            for x in range(6):
                for dy, dx in ((0, 1), (1, 0)):
                    if y + dy < 5 and x + dx < 6:
                        a, b = c[y, x], c[y + dy, x + dx]
                        num += a * b
                        den += (a * a + b * b) / 2
        assert got == pytest.approx(num / den)
    checker = np.indices((8, 8)).sum(0) % 2 * 2.0 - 1.0
    assert coherence(checker[None])[0] == pytest.approx(-1.0)
    assert coherence(np.ones((1, 4, 4)))[0] == pytest.approx(1.0)
    assert coherence(np.zeros((1, 4, 4)))[0] == 0.0


# ----------------------------------------------------------------------------- colour-vision known answers
def centre_surround(s: int, centre_radius: float, area_ratio: float, surround_contrast: float = 1.0,
                    centre=RED, surround=GREEN) -> np.ndarray:
    """A centre disc on a surround ring `area_ratio` times its area, on gray; the surround's
    colour at `surround_contrast` times the centre's distance from gray."""
    rad = disc_radius(s)
    ring = 0.5 + surround_contrast * (np.asarray(surround) - 0.5)
    out = paint(np.full((3, s, s), 0.5), rad < centre_radius * np.sqrt(1 + area_ratio), ring)
    return paint(out, rad < centre_radius, centre)


def blur(pattern: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of each colour plane, edges extended (smooth like a real filter)."""
    if sigma == 0:
        return pattern
    t = np.arange(-3, 4)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    out = np.pad(pattern, ((0, 0), (3, 3), (3, 3)), mode="edge")
    out = np.apply_along_axis(lambda v: np.convolve(v, g, mode="valid"), 1, out)
    return np.apply_along_axis(lambda v: np.convolve(v, g, mode="valid"), 2, out)


@pytest.mark.parametrize("area_ratio,contrast", [(1, 1.0), (3, 1.0), (8, 1.0), (3, 0.5), (8, 1 / 8)])
@pytest.mark.parametrize("s,radius,sigma", [(33, 5.0, 0.0), (21, 3.0, 0.0), (21, 3.0, 0.8)])
def test_centre_surround_is_double_opponent_whatever_the_area_ratio(area_ratio, contrast, s, radius, sigma):
    # (8, 1/8): a weak, wide surround of the centre's mass (a balanced receptive field).
    m = measure(blur(centre_surround(s, radius, area_ratio, contrast), sigma), GRAY)
    assert m.opponent_axis == "red-green" and m.chromatic_fraction > 0.5
    assert m.chromatic_balance >= 0.5 and m.chromatic_coherence > 0.5, m
    assert classify(m) == "double-opponent"


def test_isoluminant_red_green_edge_is_double_opponent_and_oriented():
    s = 21
    x, y = grid(s)
    for deg, left in ((90.0, x < 0), (0.0, y < 0), (45.0, y > x)):
        pattern = paint(paint(np.full((3, s, s), 0.5), left, RED), ~left, GREEN)
        lum = opponent_l(pattern)
        assert np.ptp(lum) < 1e-12                       # no luminance contrast at all
        cols = measure_batch(pattern, GRAY)
        assert cols["type"][0] == "double-opponent"
        assert cols["orientation_selective"][0] and cols["osi"][0] > 0.5
        assert angle_diff(cols["orientation_deg"][0], deg) < 5.0


def opponent_l(pattern: np.ndarray) -> np.ndarray:
    return np.einsum("c,chw->hw", OPPONENT[0], pattern)


@pytest.mark.parametrize("rgb", [RED, GREEN, BLUE, YELLOW])
def test_uniform_sign_colour_blob_is_single_opponent(rgb):
    for s, r in ((33, 6.0), (11, 2.5)):
        hard = paint(np.full((3, s, s), 0.5), disc_radius(s) < r, rgb)
        g = np.exp(-disc_radius(s) ** 2 / (2 * r ** 2))[None]
        smooth = 0.5 + (np.asarray(rgb)[:, None, None] - 0.5) * g
        for p in (hard, smooth):
            m = measure(p, GRAY)
            assert m.chromatic_balance == 0.0 and classify(m) == "single-opponent", (rgb, s, m)


def test_gray_patterns_are_neither_opponent():
    s = 21
    x, _ = grid(s)
    blob = np.repeat((0.5 + 0.3 * np.exp(-disc_radius(s) ** 2 / 18))[None], 3, axis=0)
    edge = np.repeat(np.where(x < 0, 0.2, 0.8)[None], 3, axis=0)
    for p, kind in ((blob, "other"), (edge, "orientation-selective"), (gabor(s, 30, 6, 4), "orientation-selective")):
        cols = measure_batch(p, GRAY)
        assert cols["chromatic_fraction"][0] == 0.0 and not cols["double_opponent"][0]
        assert cols["type"][0] == kind


def test_sign_balance_is_the_larger_of_mass_and_peak_balance():
    c = np.zeros((3, 4, 10))
    c[0, :, :2], c[0, :, 2:] = 1.0, -1.0     # equal peaks, masses 1:4 -> peak balance 1
    c[1, :, :2], c[1, :, 2:] = 1.0, -0.25    # masses 8:8, peaks 4:1 -> mass balance 1
    c[2, :, :2], c[2, :, 2:] = 1.0, -0.05    # masses 8:1.6, peaks 1:0.05 -> 2·1.6/9.6
    np.testing.assert_allclose(sign_balance(c), [1.0, 1.0, 2 * 1.6 / 9.6])
    assert sign_balance(np.ones((1, 3, 3)))[0] == 0.0 and sign_balance(np.zeros((1, 3, 3)))[0] == 0.0


# ----------------------------------------------------------------------------- filters in stimulus space
def brute_sta(v: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """Spike-triggered average of the linear filter v (3, k, k): the mean of the patches that
    excite it (response above its mean), relative to the mean patch."""
    r = np.einsum("nchw,chw->n", patches, v)
    return patches[r > r.mean()].mean(axis=0) - patches.mean(axis=0)


def pattern_corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_filter_stimulus_is_the_spike_triggered_average_on_demo_pixels(demo_root):
    """Real demo pixels, drawn independently per tap (the colour statistics of the data, no
    spatial correlation: what S·Aᵀw assumes): S·Aᵀw matches the brute-force STA of the filter,
    for a ZCA fitted on these pixels (S = A⁻²) and for mean/std with S their covariance."""
    import glob

    from PIL import Image

    files = sorted(glob.glob(f"{demo_root}/val/*/*"))[::8]
    pix = np.concatenate([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
                          for f in files])
    rng = np.random.default_rng(0)
    k = 7
    patches = pix[rng.integers(0, len(pix), size=(40000, k, k))].transpose(0, 3, 1, 2)
    zca = WhiteningStats().update(torch.from_numpy(pix.T.reshape(1, 3, -1, 1))).fit()
    s_data = np.cov(pix.T)
    yy, xx = np.mgrid[0:k, 0:k] - k // 2
    smooth = np.exp(-(xx ** 2 + yy ** 2) / 4.0) * np.cos(1.2 * xx)
    for state, cov in ((zca.state(), None), (IMAGENET.state(), s_data)):
        for i in range(4):
            w = rng.normal(size=(1, 3, k, k)) if i < 2 else (rng.normal(size=3)[:, None, None] * smooth)[None]
            v = filter_to_rgb(w, state)[0]
            sta = brute_sta(v, patches)
            assert pattern_corr(sta, filter_to_stimulus(w, state, cov)[0]) >= 0.95
    # With the ZCA, S·Aᵀ = A⁻¹ exactly, and S is the data's covariance up to the fit's eps.
    s_zca, origin = stimulus_covariance(zca.state())
    assert origin == "zca"
    np.testing.assert_allclose(s_zca, s_data * (len(pix) - 1) / len(pix) + 1e-5 * np.eye(3), rtol=1e-6, atol=1e-9)


def test_zca_filters_read_as_their_stimuli_under_imagenet_colour_statistics():
    """Gaussian pixels with ImageNet's colour covariance (chromatic variances 12x and 48x below
    the luminance one): the STA of a whitened model's filter is A⁻¹w, and a gray stimulus reads
    as gray, while the sensitivity Aᵀw inflates its chromatic part into 'colour'."""
    rng = np.random.default_rng(1)
    k, n = 5, 60000
    chol = np.linalg.cholesky(IMAGENET_COVARIANCE)
    pix = rng.normal(size=(n * k * k, 3)) @ chol.T + np.array([0.48, 0.46, 0.41])
    zca = WhiteningStats().update(torch.from_numpy(pix.T.reshape(1, 3, -1, 1))).fit()
    a = np.asarray(zca.matrix)
    patches = pix.reshape(n, k, k, 3).transpose(0, 3, 1, 2)
    # A nearly gray preferred stimulus (a luminance Gabor with a faint colour tint)...
    x, y = grid(k)
    stim = np.cos(1.3 * x)[None] * np.exp(-(x ** 2 + y ** 2) / 6)[None] * np.array([1.0, 0.95, 0.85])[:, None, None]
    w = np.einsum("ij,jhw->ihw", a, stim)[None]                  # the filter whose stimulus it is
    got = filter_to_stimulus(w, zca.state())
    np.testing.assert_allclose(got[0], stim, atol=1e-9)
    sta = brute_sta(filter_to_rgb(w, zca.state())[0], patches)
    assert pattern_corr(sta, got[0]) >= 0.95
    as_stimulus = measure(got[0])
    as_weights = measure(filter_to_rgb(w, zca.state())[0])
    assert as_stimulus.chromatic_fraction < 0.05
    assert as_weights.chromatic_fraction > max(1 / 3, 10 * as_stimulus.chromatic_fraction)
    assert classify(as_stimulus) == "orientation-selective"
    # A random white filter: the stimulus keeps ImageNet's proportions of chromatic energy.
    cols = measure_batch(filter_to_stimulus(rng.normal(size=(200, 3, 7, 7)), zca.state()))
    assert np.median(cols["chromatic_fraction"]) < 0.15


def test_normalize_filters_use_imagenet_covariance_unless_given():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 3, 5, 5))
    state = IMAGENET.state()
    s, origin = stimulus_covariance(state)
    assert origin == "imagenet"
    np.testing.assert_allclose(s, IMAGENET_COVARIANCE)
    expect = np.einsum("ij,njhw->nihw", IMAGENET_COVARIANCE @ np.diag(1 / np.asarray(IMAGENET.std)), w)
    np.testing.assert_allclose(filter_to_stimulus(w, state), expect)
    np.testing.assert_allclose(filter_to_stimulus(w, state, np.eye(3)), filter_to_rgb(w, state))
    with pytest.raises(ValueError):
        filter_to_stimulus(w, state, np.eye(2))
    with pytest.raises(ValueError):
        filter_to_stimulus(w, {"kind": "bogus"})


# ----------------------------------------------------------------------------- pipeline.census.patterns
def test_pattern_extraction_and_counts():
    from pipeline.results.png import decode_png, png_bytes
    from pipeline.census.patterns import (PatternError, actmax_input_patterns, actmax_image_patterns,
                                          border_colour, data_neutral, mean_colours, mean_patterns,
                                          measure_rows, summarise, format_summary)

    rng = np.random.default_rng(7)
    p = rng.random((3, 5, 5))
    p[:, 0] = np.nan
    got = mean_patterns([4], [5], [p.ravel().tolist()], "t.parquet: m conv3")
    np.testing.assert_array_equal(got[0], p)
    with pytest.raises(PatternError, match="channel 4 has 74 values, expected 3\\*size\\*size = 75"):
        mean_patterns([4], [5], [p.ravel()[:-1]], "t.parquet: m conv3")
    # Average colour over the valid pixels; the neutral is the median over channels.
    cols = mean_colours([5, 5, 5], [p.ravel(), np.full(75, 0.2), [0.0]])
    np.testing.assert_allclose(cols[0], np.nanmean(p.reshape(3, -1), axis=1))
    assert len(cols) == 2 and data_neutral([]) == (0.485, 0.456, 0.406)
    np.testing.assert_allclose(data_neutral(cols + [np.full(3, 0.9)]), np.median(np.stack(cols + [np.full(3, 0.9)]), 0))
    # PNG: exact /255, neutral = the border ring's median colour.
    img = np.full((9, 9, 3), 200, np.uint8)
    img[3:6, 3:6] = (255, 0, 0)
    pats, neutrals = actmax_image_patterns([decode_png(png_bytes(img))])
    np.testing.assert_allclose(pats[0], img.transpose(2, 0, 1) / 255.0)
    assert neutrals[0] == border_colour(pats[0]) == pytest.approx((200 / 255,) * 3)
    # actmax input: the inverse preprocessing, neutral its zero image.
    x = rng.random((3, 4, 4))
    inp = IMAGENET(torch.from_numpy(x)[None])[0].numpy()
    pats, neutrals = actmax_input_patterns([0], [inp.ravel()], IMAGENET.state())
    np.testing.assert_allclose(pats[0], x, atol=1e-6)
    np.testing.assert_allclose(neutrals[0], IMAGENET.mean)
    rows = measure_rows("m", "conv3", "mean", [0, 1], [paint(np.full((3, 9, 9), 0.5), disc_radius(9) < 3, RED),
                                                       np.full((3, 9, 9), np.nan)], [GRAY, GRAY], Thresholds())
    assert rows.column("type").to_pylist() == ["single-opponent", "empty"]
    assert rows.column("osi").to_pylist()[1] is None
    summary = summarise(rows).to_pandas()
    assert summary["count"].sum() == 2 and len(summary) == 6
    assert "single-opponent" in format_summary(summarise(rows))


def test_stray_opposite_pixels_do_not_make_a_blob_double_opponent():
    """A red blob with a few isolated green pixels as saturated as the blob: the minority sign has
    the peak but forms no region, so the sign-equalised coherence keeps it from double-opponent."""
    s = 33
    pattern = paint(np.full((3, s, s), 0.5), disc_radius(s) < 6, RED)
    for y, x in ((2, 3), (30, 5), (4, 28), (29, 29)):
        pattern[:, y, x] = GREEN
    m = measure(pattern, GRAY)
    assert m.chromatic_balance == pytest.approx(1.0)              # equal peaks...
    assert m.chromatic_coherence < 0.5                            # ...but no green region
    assert classify(m) != "double-opponent"
    np.testing.assert_allclose(equal_signs(np.array([[[2.0, -1.0, 0.0]]])), [[[1.0, -1.0, 0.0]]])


def test_rows_sort_in_display_order_for_any_names():
    """Paper names in the paper's order first, other models and module paths as first listed."""
    from pipeline.census.patterns import measure_rows, sort_rows, summarise

    pat = [np.full((3, 5, 5), 0.5)]
    keys = [("vgg16", "features.28"), ("vgg16", "features.3"), ("plainnet34", "conv3"),
            ("resnet34", "pool1"), ("resnet34", "conv3")]
    parts = [measure_rows(m, l, "mean", [0], pat, [GRAY], Thresholds()) for m, l in keys]
    import pyarrow as pa

    rows = sort_rows(pa.concat_tables(parts))
    assert list(zip(rows.column("model").to_pylist(), rows.column("layer").to_pylist())) == [
        ("resnet34", "pool1"), ("resnet34", "conv3"), ("plainnet34", "conv3"),
        ("vgg16", "features.28"), ("vgg16", "features.3")]
    summary = summarise(rows)
    assert list(dict.fromkeys(summary.column("layer").to_pylist())) == [
        "pool1", "conv3", "features.28", "features.3"]


def test_stimulus_filters_find_the_first_conv_on_rgb():
    from pipeline.models.zoo import build_model
    from pipeline.census.patterns import first_conv, first_conv_bn, stimulus_filters

    model = build_model("resnet18", num_classes=3, width=8).eval()
    name, w, noise = stimulus_filters(model, IMAGENET.state())
    assert name == "conv1" and w.shape == (8, 3, 7, 7) and noise.shape == (8,)
    assert first_conv_bn(model, "conv1") is model.bn1
    # A fresh BatchNorm (γ = 1, β = 0): the direction is S·Aᵀw, the scale λ(0)/√(uᵀSu).
    direction = filter_to_stimulus(model.conv1.weight.detach().numpy(), IMAGENET.state())
    for c in range(8):
        assert np.corrcoef(w[c].ravel(), direction[c].ravel())[0, 1] == pytest.approx(1.0)
    assert first_conv(torch.nn.Sequential(torch.nn.Linear(3, 3))) is None
    squeeze = build_model("squeezenet1_1", num_classes=3)
    assert first_conv_bn(squeeze, first_conv(squeeze)[0]) is None    # no BatchNorm: conv bias
    assert stimulus_filters(squeeze, IMAGENET.state())[1].shape[1:] == (3, 3, 3)
