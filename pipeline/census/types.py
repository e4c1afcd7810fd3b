"""Neuron-type census: orientation and colour measures of a preferred pattern, and its type.

A *pattern* is what a channel prefers, as an RGB array `(3, s, s)`: a first-conv filter mapped
to its expected mean preferred stimulus (`preferred_stimulus`: the direction S·Aᵀw — A⁻¹w for
ZCA, `filter_to_stimulus` — with the sign and scale of its BatchNorm channel), a mean
preferred stimulus, or an activation-maximization image: all stimuli, compared in one space. NaN
pixels (never inside the image) are masked out. Pure numpy: no files, no Ray.

    m = measure(pattern, neutral=(0.485, 0.456, 0.406))    # one pattern -> Measures
    cols = measure_batch(patterns, neutral, noise=se)      # (n, 3, s, s) -> column arrays
    kind = classify(m, Thresholds())                       # 'orientation-selective', ...
    c = standard_error(weight, images, base_weight)        # a mean stimulus's noise (× S)
    cols = measure_batch(means, baseline, noise=c, covariance=S)   # against its null
    sta = preferred_stimulus(weight, preprocess_state, bn=(gamma, beta, mean, var, eps))

Noise floor. A pattern is read against a reference r (its null: the mean patch of all images
at the same position for a mean stimulus when the analysis wrote one, else the neutral colour;
0 for a filter's expected stimulus): d = x − r. Its contrast is the RMS of d over valid pixels
and the three colours, in RGB units ([0, 1]). It has *structure* only when
    contrast ≥ RESOLUTION (one 8-bit level, 1/255: less is not a stimulus any image can show;
    not for filters), and, where the reading has sampling noise d ~ N(0, S·c),
    z = √(mean over pixels of dᵀ(S·c)⁻¹d / 3) ≥ K_SIGMA (4)
(S the data's colour covariance: each colour direction against its own noise). A mean stimulus
of n of N patches has c = 1/n − 1/N (`standard_error`); a filter, read as its expected mean
preferred stimulus with its scale (`preferred_stimulus`), the c of a 50,000-image mean of the
share of inputs its channel passes (`selection_noise`); an activation-maximization image none.
Under the null z² is a weighted mean of χ²₁ variables whatever the spatial correlation, and
exceeds 16 with probability at most that of one χ²₁, 6·10⁻⁵. Below the floor the type is
'no structure', whatever the orientation and colour measures say (docs/neuron_types.md).

Definitions (also in docs/neuron_types.md):

Opponent colour space. A fixed orthonormal transform of RGB,
    L  = (R + G + B) / √3,   RG = (R − G) / √2,   BY = (2B − R − G) / √6,
so energies add up (‖x‖² = L² + RG² + BY²) and the split does not depend on whether the pattern
is a stimulus or a filter (an orthonormal M gives M⁻ᵀ = M: a filter's sensitivity to each
opponent axis is the same transform of its weights).

Colour. All colour measures are taken on d = x − reference, the pattern relative to its null:
a neutral colour, the colour a pattern would have with nothing preferred (0 for filters; the
data's mean colour for mean stimuli without a baseline; the preprocessing's zero image for
activation maximization), or a mean stimulus's baseline patch. Then
    chromatic_fraction = Σ (RG² + BY²) / Σ ‖d‖²   (0 for any gray pattern on a gray neutral; 0/0 = 0)
    opponent_axis      = 'red-green' if Σ RG² ≥ Σ BY² else 'blue-yellow' ('none' if no chroma)
    double_opponent_score = balance · max(coherence, 0)
    balance   = max(share(P, N), share(P̂, N̂)),  share(a, b) = 2 · min(a, b) / (a + b),
                P, N = Σ max(±c, 0) (masses of the two signs), P̂, N̂ = max(±c) (their peaks)
    coherence = Σ e_p e_q / Σ (e_p² + e_q²)/2   over adjacent pixel pairs (lag-1 autocorrelation)
                of e = c⁺/‖c⁺‖ − c⁻/‖c⁻‖, each sign of c scaled to unit energy (`equal_signs`)
where c is the dominant opponent channel with values under 5 % of its peak |c| set to 0 (a
dead zone, so that a faint wide background offset does not count as an opposite sign). The
balance is near 1 when the two chromatic signs match in peak contrast (a strong surround of any
area) or in mass (a weak wide surround that cancels the centre; a blue | yellow edge is both),
and 0 when one sign holds throughout (a red blob on the neutral gray: single-opponent); the
coherence asks both signs to form regions rather than alternate from pixel to pixel
(chromatic white noise is balanced too, but its coherence is about 0) or than one sign being a
few stray pixels (about (coherence of the region + 0)/2 ≤ 0.5).

Orientation. Each channel of (L, RG, BY) with NaN pixels given weight 0, its window-weighted mean
removed (so DC is exactly 0), times a 2-D Hann window (length s + 2, zero end-points dropped, so
no pixel is discarded), zero-padded to n = max(64, 2s) and Fourier transformed; P(f) = Σ over
the channels of |F(f)|², so an isoluminant colour edge is oriented like a luminance edge.
Over the disc 0 < |f| ≤ ½ cycle/pixel (the disc, not the square, so that the corner bins do not
favour diagonals),
    Z   = Σ P(f) e^{2iα(f)} / Σ P(f),   α(f) = angle of the frequency vector,
    osi = |Z| ∈ [0, 1]  (1 − circular variance of doubled orientation),
    orientation_deg = (arg Z / 2 + 90°) mod 180°,
the orientation of the *stripes / edge* (perpendicular to the frequency vector), in degrees
counter-clockwise on screen: 0° = horizontal stripes (varying along rows), 90° = vertical
stripes, 45° = stripes running from bottom-left to top-right ("/").

Types, by priority: 'empty' when the pattern has no valid pixel or no energy at all (a dead
filter, a channel that never fired); 'no structure' below the noise floor; 'double-opponent'
(chromatic_fraction ≥ t.chromatic and double_opponent_score ≥ t.double_opponent);
'orientation-selective' (osi ≥ t.osi); 'single-opponent' (chromatic_fraction ≥ t.chromatic and chromatic_balance < t.double_opponent:
one sign holds); else 'other' (including balanced but incoherent colour, i.e. chromatic noise).
The properties are also flags of their own (`orientation_selective`, `single_opponent`,
`double_opponent`, `no_structure`): an oriented colour edge is oriented *and* double-opponent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["OPPONENT", "TYPES", "PROPERTIES", "RESOLUTION", "K_SIGMA", "Thresholds", "Measures",
           "opponent", "orientation", "colour", "coherence", "sign_balance", "equal_signs",
           "structure", "standard_error", "selection_noise", "filter_threshold", "measure",
           "measure_batch", "classify", "classify_batch", "filter_to_rgb", "filter_to_stimulus", "preferred_stimulus",
           "stimulus_covariance", "preprocess_matrix", "IMAGENET_COVARIANCE"]

# Rows: luminance, red-green, blue-yellow. Orthonormal (see module docstring).
OPPONENT = np.array([[1.0, 1.0, 1.0] / np.sqrt(3.0),
                     [1.0, -1.0, 0.0] / np.sqrt(2.0),
                     [-1.0, -1.0, 2.0] / np.sqrt(6.0)])

DEAD_ZONE = 0.05  # chromatic values under this fraction of the peak count as neutral
RESOLUTION = 1 / 255   # contrast floor: one 8-bit level, RMS over the pattern (RGB in [0, 1])
K_SIGMA = 4.0          # and at least this many standard errors when the reading has one
TYPES = ("double-opponent", "orientation-selective", "single-opponent", "other", "no structure",
         "empty")
# The properties recorded each on its own (bool columns), beside the dominant `type`.
PROPERTIES = ("orientation_selective", "single_opponent", "double_opponent", "no_structure")
AXES = ("red-green", "blue-yellow", "none")


@dataclass(frozen=True)
class Thresholds:
    """Type thresholds, the same for every model, layer and source."""

    osi: float = 0.5              # orientation-selective when osi >= this (7x7 noise: 95% < 0.5)
    chromatic: float = 1 / 3      # colour when chromatic energy share >= this (random RGB: 2/3)
    double_opponent: float = 0.5  # minority chromatic sign >= 1/3 of the majority's peak or mass

    def __post_init__(self) -> None:
        for name in ("osi", "chromatic", "double_opponent"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0 and math.isfinite(v)):
                raise ValueError(f"{name} threshold must be a number in [0, 1], got {v!r}")


@dataclass(frozen=True)
class Measures:
    osi: float                    # NaN when the luminance has no contrast
    orientation_deg: float        # [0, 180); NaN when osi is NaN or ~0 (isotropic)
    chromatic_fraction: float     # [0, 1]; 0 when there is no energy at all
    opponent_axis: str            # 'red-green' | 'blue-yellow' | 'none'
    double_opponent_score: float  # [0, 1]: chromatic_balance · max(chromatic_coherence, 0)
    energy: float                 # Σ ‖x − neutral‖² over valid pixels (0: empty)
    chromatic_balance: float = 0.0    # [0, 1]: 1 both signs equal, 0 one sign throughout
    chromatic_coherence: float = 0.0  # [−1, 1]: lag-1 autocorrelation of the sign-equalised dominant channel
    contrast: float = math.inf        # RMS of x − reference (RGB units); inf: not measured
    contrast_z: float = math.nan      # x − reference in standard errors (`structure`); NaN: none


def _as_batch(patterns: np.ndarray) -> np.ndarray:
    x = np.asarray(patterns, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"patterns must be (3, h, w) or (n, 3, h, w) RGB, got shape {x.shape}")
    return x


def opponent(patterns: np.ndarray) -> np.ndarray:
    """RGB (…, 3, h, w) -> (…, 3, h, w) in (L, RG, BY)."""
    x = np.asarray(patterns, dtype=np.float64)
    return np.einsum("oc,...chw->...ohw", OPPONENT, x)


def _hann(n: int) -> np.ndarray:
    # A length n + 2 Hann window without its two zero end-points: every pixel keeps some weight,
    # which matters for 7x7 filters (the plain window would throw away a third of them).
    return np.hanning(n + 2)[1:-1]


def orientation(maps: np.ndarray, valid: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(osi, orientation_deg) per pattern; NaN where no channel has contrast.

    `maps` is (h, w), (n, h, w) (one channel, e.g. luminance) or (n, k, h, w) (k channels, e.g.
    the opponent channels L, RG, BY): the power spectra of the channels are summed, so an
    isoluminant colour edge is as oriented as a luminance edge. With an orthonormal colour
    transform that sum is the same in RGB or opponent coordinates.
    """
    x = np.asarray(maps, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[:, None]
    n, k, h, w = x.shape
    if valid is None:
        valid = np.isfinite(x).all(axis=1)
    window = _hann(h)[:, None] * _hann(w)[None, :] * valid            # (n, h, w)
    x = np.where(valid[:, None], x, 0.0)
    wsum = window.sum(axis=(1, 2))
    mean = (window[:, None] * x).sum(axis=(2, 3)) / np.where(wsum > 0, wsum, 1.0)[:, None]
    # Removing the window-weighted mean makes each windowed channel's DC exactly zero: a
    # uniform colour or a luminance offset carries no orientation.
    signal = (x - mean[:, :, None, None]) * window[:, None]
    size = max(64, 2 * max(h, w))
    power = (np.abs(np.fft.fft2(signal, s=(size, size))) ** 2).sum(axis=1)
    fy = np.fft.fftfreq(size)[:, None]   # cycles per pixel along rows (downwards)
    fx = np.fft.fftfreq(size)[None, :]
    radius = np.hypot(fy, fx)
    disc = (radius > 0) & (radius <= 0.5)
    # Angle in screen coordinates (y up), so positive angles turn counter-clockwise on screen.
    doubled = np.exp(2j * np.arctan2(-fy, fx))
    p = power * disc
    total = p.sum(axis=(1, 2))
    z = (p * doubled).sum(axis=(1, 2))
    scale = np.abs(signal).max(axis=(1, 2, 3)) if signal.size else np.zeros(n)
    ok = (total > 0) & (scale > 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        osi = np.where(ok, np.abs(z) / np.where(ok, total, 1.0), np.nan)
        # An isotropic pattern has Z = 0 up to round-off: its angle means nothing.
        deg = np.where(ok & (osi > 1e-9), (np.degrees(np.angle(z)) / 2 + 90.0) % 180.0, np.nan)
    return osi, deg


def colour(patterns: np.ndarray, neutral: Sequence[float] | None = None, valid: np.ndarray | None = None
           ) -> dict[str, np.ndarray]:
    """Colour columns: chromatic_fraction, axis (0 RG / 1 BY / 2 none), chromatic_balance,
    chromatic_coherence, double_opponent_score, energy."""
    x = _as_batch(patterns)
    ref = _reference(neutral, x.shape)
    if valid is None:
        valid = np.isfinite(x).all(axis=1) & np.isfinite(ref).all(axis=1)
    d = np.where(valid[:, None], x - ref, 0.0)
    opp = opponent(d)
    energy = (d ** 2).sum(axis=(1, 2, 3))
    e_rg = (opp[:, 1] ** 2).sum(axis=(1, 2))
    e_by = (opp[:, 2] ** 2).sum(axis=(1, 2))
    chroma = e_rg + e_by
    # Below this, what is left is float round-off of a gray pattern, not colour.
    tiny = 1e-12 * np.maximum(energy, 1e-300)
    has = energy > 0
    fraction = np.where(chroma > tiny, chroma, 0.0) / np.where(has, energy, 1.0)
    axis = np.where(chroma > tiny, np.where(e_rg >= e_by, 0, 1), 2)
    dominant = np.where((axis == 0)[:, None, None], opp[:, 1], opp[:, 2])
    # A dead zone around the neutral colour: a faint, wide offset of the background (the
    # neutral colour not quite matching the data's mean) must not read as an opposite sign.
    peak = np.abs(dominant).max(axis=(1, 2), initial=0.0)
    dominant = np.where(np.abs(dominant) >= DEAD_ZONE * peak[:, None, None], dominant, 0.0)
    balance = np.where(axis < 2, sign_balance(dominant), 0.0)
    coh = np.where(axis < 2, coherence(equal_signs(dominant)), 0.0)
    return {"chromatic_fraction": fraction, "axis": axis, "chromatic_balance": balance,
            "chromatic_coherence": coh, "double_opponent_score": balance * np.clip(coh, 0.0, None),
            "energy": energy}


def _reference(neutral: Sequence[float] | np.ndarray | None, shape: tuple) -> np.ndarray:
    """The reference of every pattern, broadcast to `shape` (n, 3, h, w): a neutral colour (3,)
    or a per-pixel patch (3, h, w) / (n, 3, h, w); None is 0."""
    if neutral is None:
        return np.zeros(shape)
    ref = np.asarray(neutral, dtype=np.float64)
    if ref.ndim == 1:
        ref = ref[None, :, None, None]
    elif ref.ndim == 3:
        ref = ref[None]
    if ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(f"reference must be RGB (3,), (3, h, w) or (n, 3, h, w), got {ref.shape}")
    return np.broadcast_to(ref, shape)


def structure(d: np.ndarray, valid: np.ndarray, noise: np.ndarray | float | None = None,
              covariance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Contrast of the deviations d (n, 3, h, w) from the reference over the valid pixels
    (n, h, w), against its noise.

    `noise` is the sampling variance of the reading in units of the data's colour covariance S
    (`covariance`, default ImageNet's), per pattern (n,) or per pixel (n, h, w): a mean of n of
    N patches has d ~ N(0, S·(1/n − 1/N)) per pixel under the null. Returns `contrast` (RMS of
    d), `noise` (RMS standard error per value, 0 without one), `contrast_z` (√ of the mean of
    dᵀ(S·noise)⁻¹d / 3 per pixel: d in standard errors, each colour direction against its own
    noise, so chromatic structure is not judged by the far larger luminance noise; NaN without
    noise or pixels), `floor` (max(K_SIGMA · noise, RESOLUTION), for display) and `structured`:
    contrast ≥ RESOLUTION, and z ≥ K_SIGMA where `noise` is given."""
    return _structure(d, valid, noise, covariance, resolution=True)


def _structure(d: np.ndarray, valid: np.ndarray, noise, covariance, resolution: bool
               ) -> dict[str, np.ndarray]:
    n = d.shape[0]
    pixels = valid.sum(axis=(1, 2))
    denom = np.where(pixels > 0, 3.0 * pixels, 1.0)
    mask = np.broadcast_to(valid[:, None], d.shape)
    contrast = np.where(pixels > 0, np.sqrt(np.where(mask, d ** 2, 0.0).sum(axis=(1, 2, 3))
                                            / denom), np.nan)
    sigma, z = np.zeros(n), np.full(n, np.nan)
    enough = np.ones(n, dtype=bool)
    if noise is not None:
        s = IMAGENET_COVARIANCE if covariance is None else np.asarray(covariance, np.float64)
        c = np.asarray(noise, dtype=np.float64)
        c = np.broadcast_to(c.reshape(-1, 1, 1) if c.ndim <= 1 else c, valid.shape)
        ok = valid & np.isfinite(c)
        maha = np.einsum("nihw,ij,njhw->nhw", d, np.linalg.inv(s), d)        # dᵀ S⁻¹ d
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok & (maha > 0), maha / np.where(c > 0, c, 0.0), 0.0)
        z = np.where(pixels > 0, np.sqrt(ratio.sum(axis=(1, 2)) / denom), np.nan)
        sigma = np.sqrt(np.trace(s) / 3 * np.where(ok, c, 0.0).sum(axis=(1, 2))
                        / np.where(pixels > 0, pixels, 1.0))
        enough = z >= K_SIGMA
    floor_ok = contrast >= RESOLUTION if resolution else np.isfinite(contrast)
    structured = floor_ok & enough & (pixels > 0)
    return {"contrast": contrast, "noise": sigma, "contrast_z": z,
            "floor": np.maximum(K_SIGMA * sigma, RESOLUTION if resolution else 0.0),
            "structured": structured}


def selection_noise(threshold: np.ndarray, images: int = 50_000) -> np.ndarray:
    """A filter's sampling variance factor (`structure`'s noise) as if its expected mean
    preferred stimulus were measured as a mean stimulus: the channel is positive on a share
    p = Φ(t) of `images` patches, so its mean has noise S·(1/(p·N) − 1/N) = S·(1 − p)/(p·N).
    N defaults to ImageNet's validation set (50,000). A channel positive almost everywhere
    selects nothing and its expected stimulus sinks below that noise."""
    from scipy.special import ndtr

    p = ndtr(np.asarray(threshold, dtype=np.float64))
    with np.errstate(divide="ignore"):
        return np.where(p > 0, (1.0 - p) / (np.where(p > 0, p, 1.0) * images), np.inf)


def standard_error(weight: np.ndarray, images: np.ndarray | float,
                   base_weight: np.ndarray | None = None) -> np.ndarray:
    """Sampling variance factor c per pixel of mean stimuli (n, h, w) against their baseline
    (`structure`'s noise: d ~ N(0, S·c)).

    `weight` (n, h, w) is mean.parquet's per-pixel patch count w; patches of one image at
    nearby positions overlap, so at most one per image counts as independent: n = min(w,
    images). A mean of n patches has variance S / n. Its difference from the baseline, the mean
    of all W ≥ w patches it is a subset of, has S / n · (1 − w/W) (for the centre neuron, one
    patch per image: S · (1/n − 1/N); 0 when the channel fired on every patch). Without a
    baseline the factor is 1. NaN where w is 0.
    """
    w = np.asarray(weight, dtype=np.float64)
    cap = np.asarray(images, dtype=np.float64)
    n = np.minimum(w, cap.reshape((-1,) + (1,) * (w.ndim - 1)) if cap.ndim == 1 else cap)
    inv_n = np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), np.nan)
    keep = 1.0
    if base_weight is not None:
        bw = np.asarray(base_weight, dtype=np.float64)
        keep = np.where(bw > 0, 1.0 - w / np.where(bw > 0, bw, 1.0), 1.0)
    return inv_n * np.clip(keep, 0.0, None)


def _share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2·min(a, b) / (a + b): 1 when equal, 0 when one is 0 (0/0 := 0)."""
    tot = a + b
    return np.where(tot > 0, 2 * np.minimum(a, b) / np.where(tot > 0, tot, 1.0), 0.0)


def sign_balance(maps: np.ndarray) -> np.ndarray:
    """How strongly both signs of each map (n, h, w) are present, in [0, 1]: the larger of
    their balance in mass (Σ of each sign) and in peak (largest |value| of each sign).

    A centre-surround pattern is opponent whatever the ratio of the areas: a strong surround
    several times the centre's area has unequal masses but equal peaks; a weak, wide surround
    that cancels the centre (a balanced difference of Gaussians) has unequal peaks but equal
    masses. Either makes the minority sign a real subregion; one sign throughout gives 0.
    """
    c = np.asarray(maps, dtype=np.float64)
    pos, neg = np.clip(c, 0, None), np.clip(-c, 0, None)
    mass = _share(pos.sum(axis=(1, 2)), neg.sum(axis=(1, 2)))
    peak = _share(pos.max(axis=(1, 2), initial=0.0), neg.max(axis=(1, 2), initial=0.0))
    return np.maximum(mass, peak)


def equal_signs(maps: np.ndarray) -> np.ndarray:
    """Each map (n, h, w) with its positive and its negative part scaled to unit energy.

    The coherence of the result asks whether *both* signs form regions: on the raw map a large
    one-sign region would carry the coherence alone, and a few stray pixels of the other sign
    (noise, or a faint ring) would pass for a subregion as soon as their peak or mass is large
    enough. An absent sign stays 0.
    """
    c = np.asarray(maps, dtype=np.float64)
    pos, neg = np.clip(c, 0, None), np.clip(-c, 0, None)
    ep = np.sqrt((pos ** 2).sum(axis=(1, 2), keepdims=True))
    en = np.sqrt((neg ** 2).sum(axis=(1, 2), keepdims=True))
    return pos / np.where(ep > 0, ep, 1.0) - neg / np.where(en > 0, en, 1.0)


def coherence(maps: np.ndarray) -> np.ndarray:
    """Lag-1 spatial autocorrelation of each map (n, h, w), about 0 (not the mean), in [−1, 1].

    Σ c_p c_q / Σ (c_p² + c_q²)/2 over horizontally and vertically adjacent pixel pairs: near 1
    for regions a few pixels wide, about 0 for pixel noise (7x7 white noise: 95 % below 0.17),
    negative for a checkerboard. 0 for an all-zero map.
    """
    c = np.asarray(maps, dtype=np.float64)
    prod = (c[:, :, 1:] * c[:, :, :-1]).sum(axis=(1, 2)) + (c[:, 1:, :] * c[:, :-1, :]).sum(axis=(1, 2))
    sq = c ** 2
    norm = ((sq[:, :, 1:] + sq[:, :, :-1]).sum(axis=(1, 2))
            + (sq[:, 1:, :] + sq[:, :-1, :]).sum(axis=(1, 2))) / 2
    return np.where(norm > 0, prod / np.where(norm > 0, norm, 1.0), 0.0)


def measure_batch(patterns: np.ndarray, neutral: Sequence[float] | np.ndarray | None = None,
                  thresholds: "Thresholds | None" = None,
                  noise: np.ndarray | float | None = None, covariance: np.ndarray | None = None,
                  resolution: bool = True, against_null: bool = False) -> dict[str, np.ndarray]:
    """Column arrays for patterns (n, 3, h, w): the Measures fields, the noise floor
    (`structure`), the property flags and `type`.

    `neutral` is the reference the pattern is read against: a colour (3,) or a per-pixel patch
    (3, h, w) / (n, 3, h, w) (a mean stimulus's baseline); pixels where it is NaN are masked
    out too. `noise`: the sampling variance factor (`structure`; per pattern or per pixel) with
    the data's colour covariance `covariance`, or None for a reading without sampling error (the
    resolution floor alone). `resolution=False` drops the resolution floor (a filter's expected
    stimulus is in the data's units, where chromatic structure is faint by nature).
    `against_null`: the reference is the null the pattern was sampled against (a baseline), so a
    pattern equal to it is 'no structure', not 'empty'.
    """
    x = _as_batch(patterns)
    ref = _reference(neutral, x.shape)
    valid = np.isfinite(x).all(axis=1) & np.isfinite(ref).all(axis=1)
    d = np.where(valid[:, None], x - ref, 0.0)
    # Orientation of what is specific to the pattern (luminance and both chromatic channels):
    # a constant reference changes nothing, a baseline patch removes the null's own structure.
    osi, deg = orientation(opponent(d), valid)
    col = colour(d, None, valid)
    floor = _structure(d, valid, noise, covariance, resolution)
    cols = {
        "osi": osi,
        "orientation_deg": deg,
        "opponent_axis": np.array([AXES[a] for a in col.pop("axis")], dtype=object),
        **col,
        **{k: floor[k] for k in ("contrast", "noise", "contrast_z", "floor")},
    }
    cols.update(classify_batch({**cols, "structured": floor["structured"],
                                "against_null": np.full(len(x), against_null)},
                               thresholds or Thresholds()))
    return cols


def classify_batch(cols: dict[str, np.ndarray], t: Thresholds) -> dict[str, np.ndarray]:
    """The property flags (PROPERTIES, bools) and the dominant `type` from measure columns;
    `structured` (from `structure`) defaults to true, `contrast` ≥ RESOLUTION when given."""
    osi = np.nan_to_num(np.asarray(cols["osi"], dtype=np.float64), nan=-1.0)
    frac = np.nan_to_num(np.asarray(cols["chromatic_fraction"], dtype=np.float64), nan=-1.0)
    score = np.asarray(cols["double_opponent_score"], dtype=np.float64)
    balance = np.asarray(cols["chromatic_balance"], dtype=np.float64)
    # Empty: nothing to see (no valid pixel, a dead filter, a channel that never fired). A mean
    # stimulus read against its baseline (`against_null`) that equals it exactly (a channel
    # positive on every patch) is 'no structure' instead.
    against = np.asarray(cols.get("against_null", np.zeros(len(osi), dtype=bool)), dtype=bool)
    pixels = np.isfinite(np.asarray(cols.get("contrast", np.zeros(len(osi))), dtype=np.float64))
    empty = ~(np.asarray(cols["energy"], dtype=np.float64) > 0) & ~(against & pixels)
    if "structured" in cols:
        structured = np.asarray(cols["structured"], dtype=bool)
    else:
        structured = np.ones(len(osi), dtype=bool)
        if "contrast" in cols:
            structured &= ~(np.asarray(cols["contrast"], dtype=np.float64) < RESOLUTION)
        if "contrast_z" in cols:
            structured &= ~(np.asarray(cols["contrast_z"], dtype=np.float64) < K_SIGMA)
    flat = ~empty & ~structured          # measured, but not distinguishable from its noise
    live = ~empty & structured
    oriented = (osi >= t.osi) & live
    chromatic = (frac >= t.chromatic) & live
    double = chromatic & (score >= t.double_opponent)
    # Single-opponent: one chromatic sign holds (balance below the same threshold). Balanced but
    # incoherent colour — chromatic noise — is neither kind of opponent: 'other'.
    single = chromatic & (balance < t.double_opponent)
    kind = np.select([empty, flat, double, oriented, single],
                     ["empty", "no structure", "double-opponent", "orientation-selective",
                      "single-opponent"], "other").astype(object)
    return {"orientation_selective": oriented, "single_opponent": single,
            "double_opponent": double, "no_structure": flat, "type": kind}


def measure(pattern: np.ndarray, neutral: Sequence[float] | np.ndarray | None = None,
            noise: np.ndarray | float | None = None) -> Measures:
    """The measures of one pattern (3, h, w); `neutral` defaults to 0 (black, or a filter's zero)."""
    cols = measure_batch(pattern, neutral, noise=None if noise is None else np.atleast_1d(noise))
    return Measures(float(cols["osi"][0]), float(cols["orientation_deg"][0]),
                    float(cols["chromatic_fraction"][0]), str(cols["opponent_axis"][0]),
                    float(cols["double_opponent_score"][0]), float(cols["energy"][0]),
                    float(cols["chromatic_balance"][0]), float(cols["chromatic_coherence"][0]),
                    float(cols["contrast"][0]), float(cols["contrast_z"][0]))


def classify(m: Measures, t: Thresholds | None = None) -> str:
    cols = {k: np.array([getattr(m, k)]) for k in
            ("osi", "chromatic_fraction", "double_opponent_score", "energy", "chromatic_balance",
             "contrast", "contrast_z")}
    return str(classify_batch(cols, t or Thresholds())["type"][0])


def filter_to_rgb(weight: np.ndarray, preprocess_state: dict) -> np.ndarray:
    """First-conv weights (C, 3, h, w) acting on preprocessed input -> weights acting on RGB.

    Preprocessing is affine per pixel, p = A (x − μ): ZCA has A = its matrix, mean/std has
    A = diag(1/std), identity A = I. Then w·p = (Aᵀw)·x − const, so the RGB filter is Aᵀw
    applied at every tap; the constant only shifts the bias. This is the filter's sensitivity
    per unit RGB; to compare it with stimuli (mean preferred stimuli, drawings) use
    `filter_to_stimulus`.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"first-conv weight must be (C, 3, h, w), got shape {w.shape}")
    a = preprocess_matrix(preprocess_state)
    return np.einsum("ji,njhw->nihw", a, w)


# ImageNet's RGB pixel covariance (pixels in [0, 1]) from the eigen-decomposition used for
# AlexNet's PCA lighting noise (Krizhevsky et al. 2012; fb.resnet.torch's `pca`): columns of
# IMAGENET_EIGVEC are the eigenvectors (luminance first), IMAGENET_EIGVAL the variances along them.
# Only the shape of S matters to the census (every measure is a ratio): luminance variance 12×
# and 48× the two chromatic ones.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]])
IMAGENET_COVARIANCE = IMAGENET_EIGVEC @ np.diag(IMAGENET_EIGVAL) @ IMAGENET_EIGVEC.T


def preprocess_matrix(preprocess_state: dict) -> np.ndarray:
    """A of the per-pixel affine preprocessing p = A (x − μ)."""
    kind = preprocess_state.get("kind")
    if kind == "zca":
        return np.asarray(preprocess_state["matrix"], dtype=np.float64)
    if kind == "normalize":
        return np.diag(1.0 / np.asarray(preprocess_state["std"], dtype=np.float64))
    if kind == "identity":
        return np.eye(3)
    raise ValueError(f"unknown preprocessing {kind!r}; allowed: zca, normalize, identity")


def stimulus_covariance(preprocess_state: dict) -> tuple[np.ndarray, str]:
    """(S, where S comes from): the RGB colour covariance of the data a model was trained on.

    ZCA whitens the training data, A S Aᵀ = I, so S = A⁻¹A⁻ᵀ is known exactly (up to the fit's
    eps) from the checkpoint. Mean/std (and no) preprocessing says nothing about the colour
    correlations: S is ImageNet's published RGB covariance (IMAGENET_COVARIANCE).
    """
    a = preprocess_matrix(preprocess_state)
    if preprocess_state.get("kind") == "zca":
        inv = np.linalg.inv(a)
        return inv @ inv.T, "zca"
    return IMAGENET_COVARIANCE.copy(), "imagenet"


def filter_to_stimulus(weight: np.ndarray, preprocess_state: dict,
                       covariance: np.ndarray | None = None) -> np.ndarray:
    """First-conv weights (C, 3, h, w) on preprocessed input -> their expected mean preferred
    stimulus in RGB (C, 3, h, w), relative to the data's mean colour: S·Aᵀw at every tap.

    Why S·Aᵀw. The filter responds to RGB x as (Aᵀw)·x + const (`filter_to_rgb`). For inputs
    with mean μ and colour covariance S (pixels otherwise independent), the inputs that excite
    it have mean μ + k·S·Aᵀw, k > 0 (exact for Gaussian inputs, E[x | vᵀx > 0] = μ + √(2/π)·Sv /
    √(vᵀSv); the spike-triggered average). That is the same kind of object as a mean preferred
    stimulus, an average of stimuli. Along S's eigenvectors (variances λ) Aᵀw has components
    w_i/√λ_i for a ZCA model and the stimulus w_i·√λ_i: Aᵀw inflates the chromatic part relative
    to the luminance part by λ_lum/λ_chrom (12× and 48× on ImageNet) and reads nearly every
    filter as colour-opponent. For ZCA (A S Aᵀ = I), S·Aᵀ = A⁻¹: the
    stimulus is A⁻¹w, exact from the checkpoint alone. `covariance` overrides S (e.g. one
    estimated from the analysed data); the default is `stimulus_covariance`. The scale k is
    dropped: every census measure is a ratio.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"first-conv weight must be (C, 3, h, w), got shape {w.shape}")
    a = preprocess_matrix(preprocess_state)
    if covariance is None and preprocess_state.get("kind") == "zca":
        m = np.linalg.inv(a)                               # S·Aᵀ = A⁻¹ A⁻ᵀ Aᵀ
    else:
        s = stimulus_covariance(preprocess_state)[0] if covariance is None else np.asarray(covariance, float)
        if s.shape != (3, 3):
            raise ValueError(f"colour covariance must be 3x3, got shape {s.shape}")
        m = s @ a.T
    return np.einsum("ij,njhw->nihw", m, w)


def _mills(u: np.ndarray) -> np.ndarray:
    """φ(u)/Φ(u), the mean of a standard normal above −u, stable for any u."""
    from scipy.special import log_ndtr

    u = np.asarray(u, dtype=np.float64)
    return np.exp(-0.5 * u ** 2 - 0.5 * math.log(2 * math.pi) - log_ndtr(u))


def _response(weight: np.ndarray, preprocess_state: dict, bn: tuple | None,
              bias: np.ndarray | None, covariance: np.ndarray | None):
    """(S·u per tap, √(uᵀSu), threshold t) of each channel's effective filter u (see
    `preferred_stimulus`)."""
    w = np.asarray(weight, dtype=np.float64)
    c = w.shape[0]
    shift = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    if bn is not None:
        gamma, beta, mean, var, eps = (np.asarray(v, dtype=np.float64) for v in bn)
        a = gamma / np.sqrt(var + eps)
        b = a * (shift - mean) + beta
        spread = np.abs(a) * np.sqrt(var)
    else:
        a, b, spread = np.ones(c), shift, None
    direction = filter_to_stimulus(w * a[:, None, None, None], preprocess_state, covariance)
    v = filter_to_rgb(w * a[:, None, None, None], preprocess_state)
    s = np.sqrt(np.clip((v * direction).sum(axis=(1, 2, 3)), 0.0, None))    # √(uᵀ S u)
    spread = s if spread is None else spread
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(spread > 0, b / np.where(spread > 0, spread, 1.0), np.inf)
    return direction, s, t


def filter_threshold(weight: np.ndarray, preprocess_state: dict, bn: tuple | None = None,
                     bias: np.ndarray | None = None) -> np.ndarray:
    """Each channel's threshold t: the shift of its pre-activation in units of its spread
    (`preferred_stimulus`); the channel is positive on a share Φ(t) of its inputs."""
    return _response(weight, preprocess_state, bn, bias, None)[2]


def preferred_stimulus(weight: np.ndarray, preprocess_state: dict,
                       bn: tuple | None = None, bias: np.ndarray | None = None,
                       covariance: np.ndarray | None = None) -> np.ndarray:
    """First-conv weights (C, 3, h, w) -> each channel's expected mean preferred stimulus
    E[x − μ | z > 0] in RGB units (C, 3, h, w): the effective filter, its sign and its scale.

    The channel's pre-activation is z = a·(w·p + bias − m) + β after a BatchNorm
    `bn` = (γ, β, running_mean m, running_var v, eps), a = γ/√(v + eps) (without one: a = 1,
    m = β = 0). The sign of γ is the filter's sign: a negative scale makes the channel prefer
    the opposite stimulus. For inputs of colour covariance S (pixels independent, as in
    `filter_to_stimulus`), with the effective RGB filter u = a·Aᵀw,
        E[x − μ | z > 0] = λ(t) · S u / √(uᵀ S u),   λ(t) = φ(t)/Φ(t),
    t = b/σ_z the threshold in units of the response's spread: the shift b = a·(bias − m) + β
    over σ_z = |a|·√v, the BatchNorm's own measure of the response on the training data
    (without one, σ_z = √(uᵀSu)). λ(0) ≈ 0.80; a channel that passes nearly everything
    (t ≫ 0) selects nothing and its stimulus fades to 0; one that rarely fires (t ≪ 0) selects
    the extremes. A channel whose effective filter is 0 (γ = 0) has stimulus 0: it is constant.
    """
    direction, s, t = _response(weight, preprocess_state, bn, bias, covariance)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(s > 0, _mills(t) / np.where(s > 0, s, 1.0), 0.0)
    return direction * scale[:, None, None, None]
