"""jobs.chain: per-model options, the layer plan and the Config every chained job builds from the
chain's context, checked against the values written out by hand; every Config round-trips
through the command that reruns its stage alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from jobs import chain

DEFAULTS = dict(out="s3://b/r", preset="paper", models=("resnet34", "plainnet34"),
                stages=chain.STAGES, train_data="s3://b/train", data="s3://b/val",
                checkpoint_resnet=None, checkpoint_plainnet=None, checkpoints=None, epochs=None,
                workers=None, limit=None, seeds=1, noise_seeds=3, fractions=None,
                loader_workers=None, layers=None, actmax_layers=None, ablate_layer=None)


def opts(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**DEFAULTS, **kw})


def test_per_model_items_before_any_model_name_are_common():
    models = ("resnet50", "vgg16", "alexnet")
    assert chain.per_model("conv3, conv7,vgg16=features.4,features.28,alexnet=features.0",
                           models, "--layers") == {
        "resnet50": ["conv3", "conv7"], "vgg16": ["features.4", "features.28"],
        "alexnet": ["features.0"]}
    assert chain.per_model(None, models, "--layers") == {m: [] for m in models}
    with pytest.raises(ValueError, match=r"--layers names 'vgg19'; allowed: the --models"):
        chain.per_model("vgg19=features.4", models, "--layers")


def test_stage_names_and_tags():
    assert chain.stage_name("train", "resnet34") == "train:resnet34"
    assert chain.stage_name("ablate", "vgg16", 2) == "ablate:vgg16:seed2"
    assert chain.stage_tag("ablate:vgg16:seed2") == "[3/7] ablate:vgg16:seed2"
    assert chain.stage_tag("compare") == "[6/7] compare"
    assert chain.stage_tag("report") == "[7/7] report"


def test_checks_name_the_flag_and_what_is_allowed():
    chain.check(opts())
    for kw, needle in (({"preset": "huge"}, "allowed: demo, paper"),
                       ({"checkpoint_resnet": "r.pt", "models": ("plainnet34",)},
                        "--checkpoint-resnet is resnet34's checkpoint"),
                       ({"train_data": None}, "--preset paper needs --train-data"),
                       ({"fractions": "0.5,2"}, "--fractions item '2'")):
        with pytest.raises(ValueError, match=needle):
            chain.check(opts(**kw))
    # every model given a checkpoint: no training data needed
    chain.check(opts(train_data=None, checkpoints="resnet34=a.pt,plainnet34=b.pt"))


def _ctx(o, **kw) -> chain.Context:
    return chain.Context(o, chain.layer_plan(o), chain.given_checkpoints(o), **kw)


def _rerun(job, cfg):
    """The config its rerun command gives (jobs.reproduce's log line and run.json)."""
    import shlex

    from jobs.runtime.options import parse_config

    argv = shlex.split(chain.command(job.__name__.split(".")[-1], cfg))
    assert argv[:3] == ["python", "-m", job.__name__]
    return parse_config(type(cfg), argv[3:], job.PROG)


def test_configs_of_one_model_at_seed_1_on_a_gpu_cluster():
    from jobs import ablate, actmax, analyze, train
    from pipeline.ablation.noise import parse_subsets

    o = opts(limit=100, fractions="0.5", ablate_layer="resnet34=pool1", epochs=5)
    ckpt = "s3://b/r/seeds/1/train/resnet34/model.pt"
    ctx = _ctx(o, gpus=4, checkpoints={("resnet34", 1): ckpt},
               recipes={("resnet34", 1): {"eval_resize": 256, "eval_crop": 224}})
    assert ctx.layers["resnet34"] == chain.Layers("pool1,conv3,conv7", "pool1,conv3,conv7",
                                                  "pool1")
    built = {job: job.chained(ctx, "resnet34", 1) for job in (train, analyze, ablate)}
    assert built[train] == (train.TrainConfig(
        out="s3://b/r/seeds/1/train/resnet34", preset="paper", model="resnet34", workers=4,
        data="s3://b/train", val="s3://b/val", seed=1, use_gpu=True, epochs=5), ckpt)
    assert built[analyze] == (analyze.Config(
        checkpoint=ckpt, model="resnet34", out="s3://b/r/seeds/1/analysis/resnet34",
        layers="pool1,conv3,conv7", top_k=16, data="s3://b/val", resize=256, crop=224,
        limit=100), "s3://b/r/seeds/1/analysis/resnet34/stimuli/channels.parquet")
    assert built[ablate] == (ablate.AblateConfig(
        checkpoint=ckpt, model="resnet34", out="s3://b/r/seeds/1/ablation/resnet34", seeds=3,
        train_seed=1, from_analysis="s3://b/r/seeds/1/analysis/resnet34", data="s3://b/val",
        resize=256, crop=224, task_per="shard", layer="pool1",
        fraction=parse_subsets("0.5"), limit=100),            # paper preset: no demo shards
        "s3://b/r/seeds/1/ablation/resnet34/table1.parquet")
    # a stand-in at seed 0 (no checkpoint): no --checkpoint, no --input-size
    assert actmax.chained(ctx, "resnet34", 0) == (actmax.ActmaxConfig(
        model="resnet34", out="s3://b/r/actmax/resnet34", layers="pool1,conv3,conv7"),
        "s3://b/r/actmax/resnet34/actmax.parquet")
    for job, (cfg, _) in [*built.items(), (actmax, actmax.chained(ctx, "resnet34", 0))]:
        assert _rerun(job, cfg) == cfg
    assert chain.command("analyze", built[analyze][0]).startswith(
        "python -m jobs.analyze --data s3://b/val --model resnet34 --checkpoint " + ckpt)


def test_a_given_checkpoint_means_no_training_and_demo_ablation_shards():
    from jobs import ablate, train

    o = opts(preset="demo", train_data=None, data=None, checkpoints="resnet34=s3://c/r.pt")
    ctx = _ctx(o)
    assert train.chained(ctx, "resnet34", 0) is None
    cfg, _ = train.chained(ctx, "plainnet34", 0)
    assert (cfg.data, cfg.val, cfg.workers, cfg.use_gpu, cfg.seed) == (None, None, 2, False, None)
    cfg, _ = ablate.chained(ctx, "plainnet34", 0)
    assert (cfg.shards, cfg.eval_batch, cfg.data) == (2, 64, None)


def test_neuron_types_names_only_checkpoints_outside_out():
    from jobs import neuron_types, report

    ctx = _ctx(opts(models=("resnet34", "plainnet34", "vgg16"), layers="vgg16=features.4",
                    ablate_layer="vgg16=features.4"),
               checkpoints={("resnet34", 0): "s3://b/r/train/resnet34/model.pt",
                            ("plainnet34", 0): "s3://c/p.pt", ("vgg16", 0): None})
    cfg, done = neuron_types.chained(ctx, None, 0)
    assert cfg.argv() == ["--out", "s3://b/r/neuron_types", "--from", "s3://b/r",
                          "--checkpoint", "plainnet34=s3://c/p.pt"]
    assert done == "s3://b/r/neuron_types/summary.parquet"
    assert report.chained(ctx, None, 0) == (report.ReportConfig(out="s3://b/r"), None)


def test_the_links_are_the_stages_in_order():
    assert chain.STAGES == ("train", "analyze", "ablate", "actmax", "neuron_types", "compare",
                            "report")
    assert [link.per for link in chain.LINKS] == ["seed", "seed", "seed", "model", "once", "once",
                                                  "once"]


def test_compare_runs_once_on_the_first_two_resnet_family_models():
    from jobs import compare

    ckpts = {("resnet34", 0): "s3://b/r/train/resnet34/model.pt",
             ("plainnet34", 0): "s3://b/r/train/plainnet34/model.pt"}
    recipe = {"eval_resize": 256, "eval_crop": 224}
    ctx = _ctx(opts(), checkpoints=dict(ckpts),
               recipes={("resnet34", 0): recipe, ("plainnet34", 0): recipe})
    # the paper preset: the job's default layers (pool1, conv2 ... conv33) and minibatch (256)
    cfg, done = compare.chained(ctx, None, 0)
    assert cfg.argv() == [
        "--models", "resnet34,plainnet34", "--checkpoints",
        "s3://b/r/train/resnet34/model.pt,s3://b/r/train/plainnet34/model.pt",
        "--data", "s3://b/val", "--out", "s3://b/r/compare", "--resize", "256", "--crop", "224"]
    assert done == "s3://b/r/compare/cka.parquet"
    assert _rerun(compare, cfg) == cfg
    # the demo: the analysed layers both share, the stage outputs, minibatches of 64
    demo = opts(preset="demo", train_data=None, data=None,
                layers="pool1,conv3,plainnet34=pool1,conv7")
    cfg, _ = compare.chained(_ctx(demo), None, 0)
    assert (cfg.layers, cfg.batch_size, cfg.checkpoints, cfg.data) == (
        "pool1,layer2,layer3,layer4", 64, None, None)
    cfg, _ = compare.chained(_ctx(opts(preset="demo", limit=30)), None, 0)
    assert (cfg.batch_size, cfg.limit) == (7, 30)
    # not two ResNet-family models, or one checkpoint missing: no comparison
    assert compare.chained(_ctx(opts(models=("resnet50", "vgg16"), layers="features.4",
                                     ablate_layer="features.4")), None, 0) is None
    assert compare.chained(_ctx(opts(models=("resnet34",))), None, 0) is None
    cfg, _ = compare.chained(_ctx(opts(models=("resnet18", "plainnet18", "vgg16"),
                                       layers="vgg16=features.4",
                                       ablate_layer="vgg16=features.4")), None, 0)
    assert cfg.models == ("resnet18", "plainnet18")
    half = _ctx(opts(), checkpoints={("resnet34", 0): "a.pt", ("plainnet34", 0): None})
    assert compare.chained(half, None, 0) is None
