"""The FID InceptionV3 extractor: loads a state dict of the published weights' layout (random
weights here; no package ships the real ones), gives 2048-d pool3 features of any input, and
refuses a wrong or missing file in one line. Agreement with pytorch-fid's network itself is
checked once by bench/check_inception.py, which needs torchvision."""
from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kiln.modules.eval.extractors import build_extractor
from kiln.modules.pretrained.inception import FIDInception, InceptionV3FID
from tests.toy_generator import ClassMeans


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: on shared cores, OpenMP threads wait on each other and a 299 px forward takes
    seconds instead of ~0.2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = FIDInception()
    for m in net.modules():  # BatchNorm statistics away from the identity, as real ones are
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inception") / "fid_inception.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def extractor(weights) -> InceptionV3FID:
    return build_extractor("inception-v3-fid", weights)


def test_pool3_features(extractor, state):
    """Grey 28x28 inputs (two images, four forwards in all: CPU time is the cost here)."""
    assert extractor.name == "inception-v3-fid" and extractor.num_features == 2048
    assert all(torch.equal(v, state[k]) for k, v in extractor.net.state_dict().items())
    seen = []
    hook = extractor.net.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    grey = torch.rand(2, 1, 28, 28) * 2 - 1
    features = extractor(grey)
    hook.remove()
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()  # the mean of ReLU outputs
    assert not torch.equal(features[0], features[1]) and features.abs().max() > 0
    # Grey is RGB with equal channels, and the same input gives the same features (eval mode).
    assert torch.equal(extractor(grey.expand(-1, 3, -1, -1)), features)
    # Resized bilinearly to 299 and used as given: [-1, 1] is the network's own convention.
    resized = F.interpolate(grey.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.equal(seen[0], resized)


def test_frozen_in_eval_mode(extractor):
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())


def test_parameter_count():
    # torchvision's Inception3 without AuxLogits has 23,834,568 parameters with a 1000-way fc; the
    # TF graph's 1008-way fc adds 8 x 2049. pytorch-fid's network has the same count
    # (bench/check_inception.py compares them).
    with torch.device("meta"):
        net = FIDInception()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960


def test_weights_are_required():
    with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth"):
        build_extractor("inception-v3-fid")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"^feature extractor weights not found: {re.escape(str(path))}$"):
        build_extractor("inception-v3-fid", str(path))


def _refused(state, tmp_path) -> str:
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        InceptionV3FID(str(path))
    message = str(e.value)
    assert message.startswith(f"{path} is not an FID InceptionV3 state dict: ") and "\n" not in message
    return message


def test_wrong_shape(state, tmp_path):
    bad = dict(state)
    bad["Mixed_6a.branch3x3.conv.weight"] = torch.zeros(384, 288, 1, 1)
    assert _refused(bad, tmp_path).endswith(
        "Mixed_6a.branch3x3.conv.weight has shape (384, 288, 1, 1), expected (384, 288, 3, 3)")
    bad = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    assert _refused(bad, tmp_path).endswith("fc.weight has shape (1000, 2048), expected (1008, 2048)")


def test_missing_and_unexpected_keys(state, tmp_path):
    bad = {k: v for k, v in state.items() if k != "Mixed_7b.branch_pool.bn.running_var"}
    assert _refused(bad, tmp_path).endswith("Mixed_7b.branch_pool.bn.running_var is missing")
    assert _refused(dict(state, extra=torch.zeros(1)), tmp_path).endswith("unexpected key extra")
    assert "holds a Tensor" in _refused(torch.zeros(3), tmp_path)
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"state dict: torch.load cannot read it \(not a file torch.save wrote\)$"):
        InceptionV3FID(str(tmp_path / "bad.pth"))


def test_auxiliary_classifier_and_old_files_load(state, tmp_path, extractor):
    """A torchvision-style file with AuxLogits.* loads (they are dropped), and so does one saved
    before BatchNorm counted its batches."""
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    old |= {"AuxLogits.fc.weight": torch.zeros(1008, 768), "AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1)}
    path = tmp_path / "aux.pth"
    torch.save(old, path)
    net = InceptionV3FID(str(path))
    assert all(torch.equal(v, extractor.net.state_dict()[k]) for k, v in net.net.state_dict().items())


class _Real(L.LightningDataModule):
    def val_dataloader(self):
        torch.manual_seed(1)
        return [{"image": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.arange(4)}]


def test_kiln_eval_takes_it(weights):
    """`kiln eval --extractor inception-v3-fid --extractor-weights PATH` hands these two strings to
    evaluate_generative, which builds the extractor and scores real against generated images on
    its features. Precision/recall only: FID's 2048x2048 eigendecomposition alone takes ~5 s."""
    from kiln.trainers.commands.evaluate import evaluate_generative

    [result] = evaluate_generative([ClassMeans()], _Real(), ["precision_recall"], extractor="inception-v3-fid",
                                   extractor_weights=weights, num_samples=4, batch_size=4)
    assert result["heldout/images"] == 4 and result["samples"] == 4
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
