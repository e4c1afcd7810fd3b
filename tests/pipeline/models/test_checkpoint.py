"""Checkpoints: round trip with preprocessing, torchvision state_dicts, clear errors."""
import pytest
import torch
import torchvision

from pipeline.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import IMAGENET, WhiteningStats


def test_round_trip_restores_model_preprocessing_and_meta(tmp_path):
    torch.manual_seed(0)
    model = build_model("plainnet18", width=8, num_classes=5).eval()
    zca = WhiteningStats().update(torch.rand(4, 3, 8, 8, dtype=torch.float64)).fit()
    url = str(tmp_path / "deep" / "model.pt")
    save_checkpoint(url, model, zca, epoch=3, input_size=64)
    loaded = load_checkpoint(url)
    assert loaded.model_name == "plainnet18" and loaded.meta["epoch"] == 3
    assert loaded.meta["input_size"] == 64 and loaded.preprocess.state() == zca.state()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    with pytest.raises(CheckpointError, match="holds plainnet18, not resnet18"):
        load_checkpoint(url, "resnet18")


def test_torchvision_state_dict_loads_with_imagenet_normalisation(tmp_path):
    tv = torchvision.models.resnet18(num_classes=7).eval()
    url = str(tmp_path / "tv.pt")
    torch.save(tv.state_dict(), url)
    loaded = load_checkpoint(url, "resnet18")
    assert loaded.preprocess.state() == IMAGENET.state()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), tv(x))
    with pytest.raises(CheckpointError, match="--model"):
        load_checkpoint(url)


def test_checkpoints_that_do_not_fit_name_the_keys(tmp_path):
    url = str(tmp_path / "tv.pt")
    torch.save(torchvision.models.resnet18().state_dict(), url)
    with pytest.raises(CheckpointError, match="unexpected keys.*downsample"):
        load_checkpoint(url, "plainnet18")
    sd = build_model("plainnet18").state_dict()
    torch.save(sd, url)
    with pytest.raises(CheckpointError, match="missing keys.*downsample"):
        load_checkpoint(url, "resnet18")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"), "resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(str(tmp_path / "junk.pt"), "resnet18")
