"""pipeline.ablation.noise and pipeline.ablation.table1 against brute force: noise, subsets, plans, evaluation
sums, shard evaluation, census, Table 1."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ablation.noise import (CONDITIONS, EvalSums, Subset, ablation_layer, census_shard,
                               control_channels, default_layer, derive_seed, eval_shard,
                               evaluate, image_noise,
                               make_plan, make_plans, merge_sums, noise_edit, parse_subsets,
                               random_count_subset, random_subset)
from pipeline.stats.accumulators import ChannelStats
from pipeline.models.hooks import capture
from pipeline.models.layers import catalogue
from pipeline.data.decode import Batch
from pipeline.models.zoo import build_model
from pipeline.models.precision import strict_flags
from pipeline.ablation.table1 import (ablation_table, census_table, format_table1, inactive_channels,
                             table1)

DEAD = [1, 4, 6]


def tiny_model(dead=(), name="resnet18", classes=10):
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, width=8).eval()
    with torch.no_grad():
        for c in dead:  # a very negative BN bias: conv1's ReLU, hence pool1, is 0 everywhere
            model.bn1.bias[c] = -1e4
    return model


def images(n=12, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def forward_with_pool1_noise(model, x, noise):
    """The model's forward written out by hand, with `noise` added to pool1's output."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x)))) + noise
    h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
    return model.fc(torch.flatten(model.avgpool(h), 1))


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed("noise", 0, 5) == derive_seed("noise", 0, 5)
    seeds = {derive_seed("noise", s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)


def test_image_noise_is_relu_normal_and_a_function_of_seed_and_index():
    a = image_noise(3, 17, (8, 16, 16))
    assert a.shape == (8, 16, 16) and (a >= 0).all()
    assert torch.equal(a, image_noise(3, 17, (8, 16, 16)))
    assert not torch.equal(a, image_noise(3, 18, (8, 16, 16)))
    assert not torch.equal(a, image_noise(4, 17, (8, 16, 16)))
    big = image_noise(0, 0, (64, 64, 64)).double()
    # ReLU(N(0,1)): P(>0) = 1/2, E = 1/sqrt(2*pi)
    assert abs((big > 0).double().mean().item() - 0.5) < 0.01
    assert abs(big.mean().item() - 1 / math.sqrt(2 * math.pi)) < 0.01


def test_random_subset_keeps_each_channel_with_probability_fraction():
    pool = [2, 5, 9, 11]
    assert random_subset(0, 3, pool, 0.0) == []
    assert random_subset(0, 3, pool, 1.0) == pool
    assert random_subset(7, 3, pool, 0.5) == random_subset(7, 3, pool, 0.5)
    draws = [random_subset(7, m, pool, 0.25) for m in range(2000)]
    assert all(set(d) <= set(pool) for d in draws)
    assert abs(np.mean([len(d) for d in draws]) / len(pool) - 0.25) < 0.03
    assert len({tuple(d) for d in draws}) > 8   # drawn anew per minibatch


def test_control_channels_are_active_and_fixed_per_seed():
    active = [0, 2, 3, 5, 8, 10, 12]
    c = control_channels(4, active, 3)
    assert len(c) == 3 == len(set(c)) and set(c) <= set(active)
    assert c == control_channels(4, active, 3)
    assert len({tuple(control_channels(s, active, 3)) for s in range(20)}) > 1
    assert control_channels(0, active, 99) == active


def test_plans_select_the_right_channels():
    inactive, C, B = [1, 4, 6], 8, 4
    idx = np.arange(20)
    assert not make_plan("clean", 0, inactive, C).mask(idx, C).any()
    assert make_plan("clean", 0, inactive, C).seed == -1
    m = make_plan("inactive-all", 0, inactive, C).mask(idx, C)
    assert (m[:, inactive].all() and not m[:, [0, 2, 3, 5, 7]].any())
    control = make_plan("control-active", 2, inactive, C)
    assert len(control.channels) == 3 and not set(control.channels) & set(inactive)
    rnd = make_plan("inactive-random", 5, inactive, C, fraction=0.5, eval_batch=B)
    m = rnd.mask(idx, C)
    for i in idx:   # per image: the subset of its minibatch of the global order
        want = torch.zeros(C, dtype=torch.bool)
        want[random_subset(5, i // B, inactive, 0.5)] = True
        assert torch.equal(m[i], want)
    assert torch.equal(rnd.mask(idx[7:13], C), m[7:13])   # independent of how a batch is cut
    with pytest.raises(ValueError, match="allowed: clean"):
        make_plan("noise", 0, inactive, C)
    with pytest.raises(ValueError, match="outside"):
        make_plan("inactive-all", 0, [8], C)
    assert set(CONDITIONS) == {"clean", "inactive-all", "inactive-random", "control-active"}


def test_evaluate_clean_is_the_plain_forward_and_noise_matches_a_hand_written_forward():
    model = tiny_model(DEAD)
    pool1 = catalogue(model)["pool1"]
    x, idx = images(6), np.arange(30, 36)
    with torch.no_grad():
        assert torch.equal(evaluate(model, pool1, x, idx, make_plan("clean", 0, DEAD, 8)), model(x))
        cache = {}   # one batch's noise, shared by the plans of seed 3
        for cond in ("inactive-all", "inactive-random", "control-active"):
            plan = make_plan(cond, 3, DEAD, 8, fraction=0.5, eval_batch=4)
            shape = capture(model, x, [pool1])["pool1"].shape
            noise = torch.stack([image_noise(3, int(i), shape[1:]) for i in idx])
            noise = noise * plan.mask(idx, 8)[:, :, None, None]
            want = forward_with_pool1_noise(model, x, noise)
            got = evaluate(model, pool1, x, idx, plan)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert torch.equal(evaluate(model, pool1, x, idx, plan, cache), got)
            # the noise only ever lands on the planned channels
            seen = capture(model, x, [pool1], edit={"pool1": noise_edit(3, idx, plan.mask(idx, 8))})
            moved = (seen["pool1"] != capture(model, x, [pool1])["pool1"]).any(3).any(2).any(0)
            assert set(torch.nonzero(moved).flatten().tolist()) <= set(plan.channels)


def test_noise_on_inactive_channels_moves_the_loss():
    model = tiny_model(DEAD)
    pool1 = catalogue(model)["pool1"]
    x, idx = images(8), np.arange(8)
    labels = torch.arange(8) % 10
    losses = {}
    for cond in CONDITIONS:
        plan = make_plan(cond, 0, DEAD, 8)
        losses[cond] = EvalSums(4).update(evaluate(model, pool1, x, idx, plan), labels, idx,
                                          plan.mask(idx, 8)).totals()
    assert losses["inactive-all"]["loss"] != pytest.approx(losses["clean"]["loss"], abs=1e-4)
    assert losses["control-active"]["loss"] != pytest.approx(losses["clean"]["loss"], abs=1e-4)
    assert losses["inactive-all"]["noised_per_image"] == 3
    assert losses["clean"]["noised_per_image"] == 0
    # a plan with nothing to noise is the clean forward
    empty = make_plan("inactive-all", 0, [], 8)
    assert not empty.noisy
    assert torch.equal(evaluate(model, pool1, x, idx, empty), model(x))


def test_eval_sums_equal_direct_cross_entropy_and_topk():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 10, generator=g)
    labels = torch.randint(0, 10, (37,), generator=g)
    idx = np.arange(100, 137)
    t = EvalSums(8).update(logits, labels, idx).totals()
    assert t["images"] == 37
    assert t["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    top5 = logits.topk(5, 1).indices
    assert t["top1_count"] == int((logits.argmax(1) == labels).sum())
    assert t["top5_count"] == int((top5 == labels[:, None]).any(1).sum())
    # fewer than five classes: top-5 is every class
    t3 = EvalSums(8).update(logits[:, :3], labels % 3, idx).totals()
    assert t3["top5"] == 1.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 36), max_size=4, unique=True), st.integers(1, 9))
def test_eval_sums_merge_of_minibatch_aligned_splits_equals_one_pass(cuts, batch):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(37, 10, generator=g) * 3
    labels = torch.randint(0, 10, (37,), generator=g)
    idx = np.arange(37)
    whole = EvalSums(batch)
    for s in range(0, 37, batch):
        whole.update(logits[s:s + batch], labels[s:s + batch], idx[s:s + batch])
    bounds = sorted({0, 37, *[min(37, c * batch) for c in cuts]})
    merged = EvalSums(batch)
    for a, b in reversed(list(zip(bounds, bounds[1:]))):   # any order
        part = EvalSums(batch)
        for s in range(a, b, batch):
            part.update(logits[s:min(s + batch, b)], labels[s:min(s + batch, b)],
                        idx[s:min(s + batch, b)])
        merged.merge(EvalSums.from_state(part.state()))
    assert merged.totals() == whole.totals()


def test_census_table_flags_inactive_and_near_dead_channels():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(10, 6, 20, 20, generator=g) - 1.5)
    acts[:, 2] = 0
    acts[:, 4] = 0
    acts[3, 4, 1, 1] = 0.25    # positive at 1 of 4000 positions: near dead, not inactive
    stats = ChannelStats(6).update(acts[:4]).merge(ChannelStats(6).update(acts[4:]))
    other = ChannelStats(6).update(acts).to_table("other", "pool1")
    channels = pa.concat_tables([other, stats.to_table("m", "pool1")])
    census = census_table(channels, "m", "pool1", 6)
    rows = census.to_pylist()
    assert [r["channel"] for r in rows] == list(range(6)) and {r["model"] for r in rows} == {"m"}
    assert inactive_channels(census) == [2]
    assert [r["channel"] for r in rows if r["near_dead"]] == [2, 4]
    frac = (acts > 0).double().mean((0, 2, 3))
    for r in rows:
        assert r["max"] == pytest.approx(acts[:, r["channel"]].max().item())
        assert r["positive_fraction"] == pytest.approx(frac[r["channel"]].item())
        assert r["images"] == 10
    with pytest.raises(ValueError, match="no rows for model 'x'.*m/pool1"):
        census_table(channels, "x", "pool1", 6)
    with pytest.raises(ValueError, match="has 8"):
        census_table(channels, "m", "pool1", 8)
    with pytest.raises(ValueError, match="lack column"):
        census_table(channels.drop(["inactive"]), "m", "pool1", 6)


@pytest.mark.parametrize("name", ["resnet18", "plainnet18"])
def test_census_finds_forced_dead_pool1_channels(name):
    model = tiny_model(DEAD, name=name)
    pool1 = catalogue(model)["pool1"]
    stats = ChannelStats(8)
    x = images(12)
    for s in range(0, 12, 5):
        stats.update(capture(model, x[s:s + 5], [pool1])["pool1"])
    census = census_table(stats.to_table(name, "pool1"), name, "pool1", 8)
    brute = [c for c in range(8) if (capture(model, x, [pool1])["pool1"][:, c] == 0).all()]
    assert inactive_channels(census) == brute == DEAD


def test_parse_subsets_reads_fractions_percentages_and_channel_counts():
    assert parse_subsets("0.75, 25%,1ch,0.5,0.25") == (
        Subset(count=1), Subset(0.25), Subset(0.5), Subset(0.75))
    assert [s.label for s in parse_subsets("2ch,1ch,1")] == ["1ch", "2ch", "1"]
    for bad in ("0", "1.5", "0ch", "x", "", "-1ch"):
        with pytest.raises(ValueError, match="fraction"):
            parse_subsets(bad)


def test_count_subsets_noise_exactly_k_channels_redrawn_per_minibatch():
    inactive, C, B = [1, 4, 6, 7], 8, 4
    idx = np.arange(400)
    for k in (1, 3, 9):
        plan = make_plan("inactive-random", 2, inactive, C, eval_batch=B, count=k)
        assert plan.subset == Subset(count=k) and plan.fraction is None
        m = plan.mask(idx, C)
        assert (m.sum(1) == min(k, len(inactive))).all()          # exactly k per image
        assert not m[:, [0, 2, 3, 5]].any()                        # inactive channels only
        for i in idx[:40]:   # the subset of its minibatch of the global order
            assert m[i].nonzero().flatten().tolist() == \
                random_count_subset(2, i // B, inactive, k)
        assert len({tuple(r.nonzero().flatten().tolist()) for r in m}) == \
            (1 if k >= len(inactive) else math.comb(len(inactive), k))   # redrawn
    # each channel equally often with one channel per minibatch
    hits = np.bincount([random_count_subset(0, m, inactive, 1)[0] for m in range(4000)],
                       minlength=C)[inactive]
    assert (abs(hits / 4000 - 0.25) < 0.03).all()


def _one_training_seed(dead, train_seed, x, labels, idx, subsets, B=4):
    """ablation and census rows of one 'training run': a tiny model with `dead` channels."""
    model = tiny_model(dead)
    pool1 = catalogue(model)["pool1"]
    census = census_table(ChannelStats(8).update(capture(model, x, [pool1])["pool1"])
                          .to_table("resnet18", "pool1"), "resnet18", "pool1", 8, train_seed)
    inactive = inactive_channels(census)
    plans = [make_plan("clean", 0, inactive, 8)]
    for seed in (0, 1) if inactive else ():    # as make_plans: only `clean` when none is inactive
        plans += [make_plan("inactive-all", seed, inactive, 8),
                  make_plan("control-active", seed, inactive, 8)]
        plans += [make_plan("inactive-random", seed, inactive, 8, fraction=s.fraction or 0.0,
                            eval_batch=B, count=s.count) for s in subsets]
    results = []
    for plan in plans:   # one forward of every image; minibatches are idx // B all the same
        logits = evaluate(model, pool1, x, idx, plan)
        sums = EvalSums(B).update(logits, labels, idx, plan.mask(idx, 8) if plan.noisy else None)
        results.append((plan, sums.totals()))
    return ablation_table("resnet18", "pool1", inactive, subsets, results, [0, 1],
                          train_seed), census


def test_table1_is_mean_and_std_across_training_seeds():
    x, idx = images(8), np.arange(8)
    labels = torch.arange(8) % 10
    subsets = parse_subsets("1ch,0.5")
    parts = [_one_training_seed(DEAD, 0, x, labels, idx, subsets),
             _one_training_seed([2, 5], 3, x, labels, idx, subsets)]
    ablation = pa.concat_tables([a for a, _ in parts])
    census = pa.concat_tables([c for _, c in parts])
    t1 = table1(ablation, census).to_pylist()
    assert [(r["condition"], r["subset_channels"], r["fraction"]) for r in t1] == [
        ("inactive-all", None, None), ("inactive-random", 1, None), ("inactive-random", None, 0.5)]
    rows = ablation.to_pylist()

    def per_seed(cond, sub=(None, None)):   # by hand: each training seed's mean over noise seeds
        return [statistics.mean(r["delta_loss"] for r in rows if r["train_seed"] == t
                                and r["condition"] == cond
                                and (r["subset_channels"], r["fraction"]) == sub)
                for t in (0, 3)]

    for r in t1:
        assert (r["train_seeds"], r["train_seed_ids"], r["inactive_per_seed"]) == \
            (2, [0, 3], [3, 2])
        assert r["inactive_mean"] == 2.5 and r["inactive_std"] == pytest.approx(math.sqrt(0.5))
        assert r["inactive"] is None and r["std_across"] == "training seeds" and r["seeds"] == 2
        clean = [c["loss"] for c in rows if c["condition"] == "clean"]
        assert r["clean_loss"] == pytest.approx(statistics.mean(clean))
    full = t1[0]
    for cond, key in (("inactive-all", "delta_loss"), ("control-active", "control_delta_loss")):
        d = per_seed(cond)
        assert full[f"{key}_mean"] == pytest.approx(statistics.mean(d))
        assert full[f"{key}_std"] == pytest.approx(statistics.stdev(d))
    assert full["delta_loss_per_seed"] == pytest.approx(per_seed("inactive-all"))
    for r in t1[1:]:
        d = per_seed("inactive-random", (r["subset_channels"], r["fraction"]))
        assert r["delta_loss_rnd_mean"] == pytest.approx(statistics.mean(d))
        assert r["delta_loss_rnd_std"] == pytest.approx(statistics.stdev(d))
        assert r["delta_loss_per_seed"] == pytest.approx(d)
    text = format_table1(table1(ablation, census), census)
    assert "training seeds" in text and "2.5±0.7/8" in text and "training seed 3" in text
    # one training seed alone: today's table, std over the noise seeds
    (one, *_) = table1(parts[0][0], parts[0][1]).to_pylist()
    d = [r["delta_loss"] for r in rows if r["train_seed"] == 0 and r["condition"] == "inactive-all"]
    assert (one["inactive"], one["inactive_channels"], one["std_across"]) == \
        (3, DEAD, "noise seeds")
    assert one["delta_loss_std"] == pytest.approx(statistics.stdev(d))


def _batches(x, labels, idx, size):
    """pipeline.data.decode.Batch objects as iter_batches yields them (uint8 images)."""
    for a in range(0, len(idx), size):
        yield Batch(x[a:a + size], idx[a:a + size], labels[a:a + size].numpy(), [])


def test_shards_equal_a_single_pass_and_their_merge_is_exact():
    """census_shard = ChannelStats of one forward; eval_shard over two minibatch-aligned
    shards, merged, = each plan evaluated on every image at once; both in strict fp32."""
    model = tiny_model(DEAD)
    pool1 = catalogue(model)["pool1"]
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels, idx = torch.arange(12) % 10, np.arange(12)
    pre = (lambda t: t * 2 - 1)
    stats, skipped, flags = census_shard(model, pre, pool1, _batches(x, labels, idx, 4))
    whole = capture(model, pre(x.float() / 255), [pool1])["pool1"]
    assert stats.state().keys() == ChannelStats(8).update(whole).state().keys()
    assert inactive_channels(census_table(stats.to_table("m", "pool1"), "m", "pool1", 8)) == DEAD
    assert skipped == [] and flags == strict_flags()
    plans = make_plans(DEAD, 8, [0], parse_subsets("1ch,0.5"), eval_batch=4)
    assert [p.label for p in plans] == [
        "clean_seed-1", "inactive-all_seed0", "inactive-random-1ch_seed0",
        "inactive-random-0.5_seed0", "control-active_seed0"]
    assert make_plans([], 8, [0], (), 4) == plans[:1]
    parts = [eval_shard(model, pre, pool1, plans, _batches(x[a:b], labels[a:b], idx[a:b], 4), 4)
             for a, b in ((8, 12), (0, 8))]
    merged = merge_sums(parts[0][0], parts[1][0])
    for plan in plans:
        logits = evaluate(model, pool1, pre(x.float() / 255), idx, plan)
        want = EvalSums(4).update(logits, labels, idx, plan.mask(idx, 8) if plan.noisy else None)
        got = merged[plan.label].totals()
        assert got["loss"] == pytest.approx(want.totals()["loss"], rel=1e-6)
        assert {k: got[k] for k in ("images", "top1_count", "noised_per_image")} == \
            {k: want.totals()[k] for k in ("images", "top1_count", "noised_per_image")}


def test_default_layer_is_pool1_or_the_first_max_pool():
    assert default_layer(tiny_model()) == "pool1"
    assert default_layer(build_model("squeezenet1_1", num_classes=3)) == "features.2"
    with pytest.raises(ValueError, match="no max-pooling layer.*--layer"):
        default_layer(build_model("mobilenet_v3_small", num_classes=3))


def test_ablation_layer_is_one_layer_with_channel_maps():
    model = tiny_model()
    assert ablation_layer(model) == catalogue(model)["pool1"]
    assert ablation_layer(model, "conv2") == catalogue(model)["conv2"]
    assert ablation_layer(model, "maxpool").channels == 8
    for spec in ("fc", "pool1,conv2"):
        with pytest.raises(ValueError, match=f"--layer must name one layer.*got '{spec}'"):
            ablation_layer(model, spec)
    with pytest.raises(ValueError, match="nowhere"):
        ablation_layer(model, "nowhere")


def test_table1_counts_the_training_seeds_each_cell_stands_on():
    """Seed 0 with inactive channels, seed 1 with none: ΔL, ΔL_rnd and control ΔL stand on
    seed 0 alone ("n = 1 of 2", no ±), the inactive count on both (mean ± std), in the table,
    its cells and the console text."""
    from pipeline.ablation.table1 import table1_cells

    x, idx = images(8), np.arange(8)
    labels = torch.arange(8) % 10
    subsets = parse_subsets("0.5")
    parts = [_one_training_seed(DEAD, 0, x, labels, idx, subsets),
             _one_training_seed([], 1, x, labels, idx, subsets)]
    assert inactive_channels(parts[1][1]) == []
    ablation = pa.concat_tables([a for a, _ in parts])
    census = pa.concat_tables([c for _, c in parts])
    t1 = table1(ablation, census).to_pylist()
    rows = ablation.to_pylist()
    seed0 = {cond: statistics.mean(r["delta_loss"] for r in rows if r["train_seed"] == 0
                                   and r["condition"] == cond)
             for cond in ("inactive-all", "control-active", "inactive-random")}
    full, rnd = t1
    assert (full["train_seeds"], full["contributing_seeds"]) == (2, 1)
    assert (rnd["train_seeds"], rnd["contributing_seeds"]) == (2, 1)
    assert full["delta_loss_mean"] == pytest.approx(seed0["inactive-all"])
    assert full["control_delta_loss_mean"] == pytest.approx(seed0["control-active"])
    assert rnd["delta_loss_rnd_mean"] == pytest.approx(seed0["inactive-random"])
    assert full["delta_loss_std"] is None and rnd["delta_loss_rnd_std"] is None
    assert full["delta_loss_per_seed"][1] is None
    assert full["inactive_per_seed"] == [3, 0] and full["inactive_mean"] == 1.5
    assert full["inactive_std"] == pytest.approx(statistics.stdev([3, 0]))
    cells = table1_cells(full)
    assert cells["ΔL"] == f"{seed0['inactive-all']:+.4f} (n = 1 of 2)"
    assert cells["control ΔL"] == f"{seed0['control-active']:+.4f} (n = 1 of 2)"
    assert cells["inactive"] == "1.5±2.1/8"
    assert table1_cells(rnd)["ΔL"] == f"{seed0['inactive-random']:+.4f} (n = 1 of 2)"
    text = format_table1(table1(ablation, census), census)
    assert f"{seed0['inactive-all']:+.4f} (n = 1 of 2)" in text
    assert "n = 1 of 2" in text.splitlines()[4]              # the random-subset row too
    assert "train seed 1: no inactive channel" in text
    # Both seeds with inactive channels: n = 2 of 2 and a ± over them; none: n = 0 of 2.
    both = pa.concat_tables([parts[0][0], _one_training_seed([2, 5], 3, x, labels, idx,
                                                              subsets)[0]])
    both_census = pa.concat_tables([parts[0][1], _one_training_seed([2, 5], 3, x, labels, idx,
                                                                    subsets)[1]])
    two = table1(both, both_census).to_pylist()[0]
    assert two["contributing_seeds"] == 2 and " ± " in table1_cells(two)["ΔL"]
    assert table1_cells(two)["ΔL"].endswith("(n = 2 of 2)")
    none = table1(pa.concat_tables([parts[1][0], _one_training_seed([], 2, x, labels, idx,
                                                                     subsets)[0]]),
                  pa.concat_tables([parts[1][1], _one_training_seed([], 2, x, labels, idx,
                                                                    subsets)[1]])).to_pylist()[0]
    assert none["contributing_seeds"] == 0 and table1_cells(none)["ΔL"] == "n/a (n = 0 of 2)"
    # One training seed: the ± is over its noise seeds, and the cell says so.
    (one, *_) = table1(parts[0][0], parts[0][1]).to_pylist()
    assert table1_cells(one)["ΔL"].endswith("(n = 2 noise seeds)")
