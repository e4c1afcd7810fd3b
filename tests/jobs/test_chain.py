"""jobs.chain: per-model options, the layer plan and the command line of every job the chain
runs, checked against the commands written out by hand."""
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


def test_commands_of_one_model_at_seed_1_on_a_gpu_cluster():
    o = opts(limit=100, fractions="0.5", ablate_layer="resnet34=pool1", epochs=5)
    layers = chain.layer_plan(o)["resnet34"]
    assert layers == chain.Layers("pool1,conv3,conv7", "pool1,conv3,conv7", "pool1")
    assert chain.train_argv(o, "resnet34", 1, gpus=4) == [
        "--preset", "paper", "--model", "resnet34", "--out", "s3://b/r/seeds/1/train/resnet34",
        "--workers", "4", "--data", "s3://b/train", "--val", "s3://b/val", "--seed", "1",
        "--use-gpu", "--epochs", "5"]
    ckpt, recipe = "s3://b/r/seeds/1/train/resnet34/model.pt", {"eval_resize": 256,
                                                              "eval_crop": 224}
    assert chain.analyze_argv(o, "resnet34", 1, layers, ckpt, recipe) == [
        "--checkpoint", ckpt, "--model", "resnet34", "--out",
        "s3://b/r/seeds/1/analysis/resnet34", "--layers", "pool1,conv3,conv7", "--top-k", "16",
        "--data", "s3://b/val", "--resize", "256", "--crop", "224", "--limit", "100"]
    assert chain.ablate_argv(o, "resnet34", 1, layers, ckpt, recipe) == [
        "--checkpoint", ckpt, "--model", "resnet34", "--out",
        "s3://b/r/seeds/1/ablation/resnet34", "--seeds", "3", "--train-seed", "1", "--from",
        "s3://b/r/seeds/1/analysis/resnet34", "--data", "s3://b/val", "--resize", "256",
        "--crop", "224", "--task-per", "shard", "--layer", "pool1", "--fraction", "0.5",
        "--limit", "100"]                                      # paper preset: no demo shards
    assert chain.actmax_argv(o, "resnet34", layers, None, None) == [
        "--model", "resnet34", "--out", "s3://b/r/actmax/resnet34", "--layers",
        "pool1,conv3,conv7"]                                   # a stand-in: no checkpoint


def test_neuron_types_names_only_checkpoints_outside_out():
    argv = chain.neuron_types_argv(opts(), {"resnet34": "s3://b/r/train/resnet34/model.pt",
                                            "plainnet34": "s3://c/p.pt", "vgg16": None})
    assert argv == ["--from", "s3://b/r", "--out", "s3://b/r/neuron_types",
                    "--checkpoint", "plainnet34=s3://c/p.pt"]


def test_compare_runs_on_the_first_two_resnet_family_models():
    o = opts()
    assert chain.compare_pair(o) == ("resnet34", "plainnet34")
    assert chain.compare_pair(opts(models=("resnet50", "vgg16"))) is None
    assert chain.compare_pair(opts(models=("resnet34",))) is None
    assert chain.compare_pair(opts(models=("resnet18", "plainnet18", "vgg16"))) == \
        ("resnet18", "plainnet18")
    ckpts = ("s3://b/r/train/resnet34/model.pt", "s3://b/r/train/plainnet34/model.pt")
    recipe = {"eval_resize": 256, "eval_crop": 224}
    # the paper preset: the job's default layers (pool1, conv2 ... conv33) and minibatch (256)
    assert chain.compare_argv(o, ("resnet34", "plainnet34"), chain.layer_plan(o), ckpts,
                              recipe) == [
        "--models", "resnet34,plainnet34", "--out", "s3://b/r/compare", "--checkpoints",
        ",".join(ckpts), "--data", "s3://b/val", "--resize", "256", "--crop", "224"]
    # the demo: the analysed layers both share, the stage outputs, minibatches of 64
    demo = opts(preset="demo", train_data=None, data=None,
                layers="pool1,conv3,plainnet34=pool1,conv7")
    assert chain.compare_argv(demo, ("resnet34", "plainnet34"), chain.layer_plan(demo),
                              (None, None), None) == [
        "--models", "resnet34,plainnet34", "--out", "s3://b/r/compare",
        "--layers", "pool1,layer2,layer3,layer4", "--batch-size", "64"]
    limited = opts(preset="demo", limit=30)
    argv = chain.compare_argv(limited, ("resnet34", "plainnet34"), chain.layer_plan(limited),
                              ckpts, None)
    assert argv[argv.index("--batch-size") + 1] == "7" and "--limit" in argv
