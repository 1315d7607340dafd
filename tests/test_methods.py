"""The training methods (mtfc.distill and the options that use it) on known inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtfc.codec import Codec
from mtfc.data import MultiTaskDataset, collate, make_dataset
from mtfc.distill import (bounded_regression, feature_mse, gradcam, hint_loss, nfd_loss, saliency_weights,
                          select_taps, standardize, weighted_soft_ce)
from mtfc.head import HEADS, Head
from mtfc.teacher import build_teacher, candidate_taps, normalize, teacher_taps
from mtfc.train import BottleneckTask, HeadTask

g = torch.Generator().manual_seed(0)
S, T = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)


def test_feature_mse_with_a_saliency_map_of_ones_is_the_plain_loss():
    assert torch.allclose(feature_mse(S, T, torch.ones(2, 5, 6)), F.mse_loss(S, T), rtol=1e-6)
    assert feature_mse(S, T) == F.mse_loss(S, T)
    w = torch.zeros(2, 5, 6)
    w[:, 0, 0] = 30.0  # all the weight on one position: the loss is that position's error
    assert torch.allclose(feature_mse(S, T, w), ((S - T)[:, :, 0, 0] ** 2).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="weight of shape"):
        feature_mse(S, T, torch.ones(2, 6, 5))


def test_gradcam_is_normalised_and_follows_the_class_evidence():
    # one channel, logits = [sum of the features, 0]: the gradient is uniform, so the map is the
    # (ReLU'd) feature itself divided by its mean.
    feat = torch.tensor([[[[1.0, 3.0], [0.0, -2.0]]]], requires_grad=True)
    logits = torch.stack([feat.sum(), torch.zeros(())])[None]
    cam = gradcam({"f": feat}, logits, ["f"])["f"]
    assert torch.allclose(cam, torch.tensor([[[1.0, 3.0], [0.0, 0.0]]]) / 1.0)
    assert torch.allclose(cam.mean(), torch.tensor(1.0))
    assert torch.equal(saliency_weights({"f": cam}, 0.0)["f"], torch.ones_like(cam))
    assert torch.allclose(saliency_weights({"f": cam}, 0.5)["f"], 0.5 + 0.5 * cam)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        saliency_weights({"f": cam}, 1.5)


def test_nfd_is_invariant_to_the_teachers_scale_and_zero_at_the_standardised_teacher():
    adapters = nn.ModuleList([nn.Conv2d(4, 4, 1)])
    base = nfd_loss([S], [T], adapters)
    assert torch.allclose(nfd_loss([S], [7.3 * T], adapters), base, rtol=1e-5)
    assert torch.allclose(nfd_loss([S], [T + 5.0], adapters), base, rtol=1e-5)
    identity = nn.ModuleList([nn.Identity()])
    assert nfd_loss([standardize(T)], [T], identity) == 0.0
    assert torch.allclose(standardize(T).mean((2, 3)), torch.zeros(2, 4), atol=1e-6)


def test_hint_loss_is_the_mse_after_adaptation():
    assert hint_loss([S, S], [T, T], nn.ModuleList([nn.Identity(), nn.Identity()])) == F.mse_loss(S, T)
    with pytest.raises(ValueError, match="adapters"):
        hint_loss([S], [T], nn.ModuleList())


def test_bounded_regression_is_zero_where_the_student_beats_the_teacher():
    y = torch.zeros(2, 4)
    student = torch.tensor([[0.1, 0, 0, 0], [2.0, 0, 0, 0]])
    teacher = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    # row 0: 0.01 < 1 (student better) → 0; row 1: 4 > 1 → 4; mean 2
    assert bounded_regression(student, teacher, y) == 2.0
    assert bounded_regression(student[:1], teacher[:1], y[:1]) == 0.0
    assert bounded_regression(student[:1], teacher[:1], y[:1], margin=1.0) == pytest.approx(0.01)
    assert bounded_regression(student[:0], teacher[:0], y[:0]) == 0.0


def test_weighted_soft_ce_on_one_hot_teachers_is_the_weighted_cross_entropy():
    logits = torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 3, 1])
    teacher = 1e4 * F.one_hot(labels, 4).float()  # a certain teacher
    ones = torch.ones(4)
    assert torch.allclose(weighted_soft_ce(logits, teacher, ones), F.cross_entropy(logits, labels), rtol=1e-5)
    w = torch.tensor([1.0, 1.0, 1.0, 1.5])
    assert torch.allclose(weighted_soft_ce(logits, teacher, w),
                          F.cross_entropy(logits, labels, reduction="none").mul(w[labels]).mean(), rtol=1e-5)


def test_select_taps_picks_one_representative_per_cluster():
    low = {f"l{i}": torch.full((2, 3, 4, 4), 0.1 * (i + 1)) for i in range(3)}
    high = {f"h{i}": 100 + torch.randn(2, 3, 4, 4, generator=g) * (50 + i) for i in range(2)}
    feats = {**low, **high}
    chosen = select_taps(feats, 2)
    assert len(chosen) == 2 and chosen[0].startswith("l") and chosen[1].startswith("h")
    assert chosen[0] == "l1"  # the middle of the three near-identical low taps is closest to their centroid
    assert select_taps(feats, 5) == list(feats)
    with pytest.raises(ValueError, match="cannot select"):
        select_taps(feats, 0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher = build_teacher("resnet18", num_classes=3).eval()
    codec = Codec(latent_channels=4, hidden_channels=8, out_channels=64)
    return teacher, codec, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_teacher_taps_name_every_block_and_match_the_stage_outputs(tiny):
    teacher, _, images = tiny
    assert candidate_taps(teacher) == ["layer1", "layer2.0", "layer2", "layer3.0", "layer3", "layer4.0", "layer4"]
    taps = teacher_taps(teacher, images)
    with torch.no_grad():
        direct = teacher.layer2(taps["layer1"])
    assert torch.equal(taps["layer2"], direct)
    with torch.no_grad():
        assert torch.equal(taps["logits"], teacher(normalize(images)))


def test_saliency_changes_the_training_loss_only(tiny):
    teacher, codec, images = tiny
    plain = BottleneckTask(codec, teacher, beta=1.0, stages=["layer1", "layer2.0"])
    salient = BottleneckTask(codec, teacher, beta=1.0, stages=["layer1", "layer2.0"], saliency=1.0)
    torch.manual_seed(0)
    a = plain.train()((images, None))
    torch.manual_seed(0)
    b = salient.train()((images, None))
    assert torch.equal(a["bpp"], b["bpp"]) and not torch.equal(a["distill"], b["distill"])
    b["loss"].backward()  # the saliency pass leaves a loss that still trains the codec
    assert codec.g_a[0].weight.grad is not None
    plain.eval(), salient.eval()
    with torch.no_grad():
        assert torch.equal(plain.distill(images)[0], salient.distill(images)[0])  # validation: the plain loss
    with pytest.raises(ValueError, match="unknown distillation taps"):
        BottleneckTask(codec, teacher, beta=1.0, stages=["layer5"])


def test_the_summed_reduction_weights_each_tap_by_its_elements_per_pixel(tiny):
    """sc2bench's Entropic Student loss: Σ_taps SSE + β·bits, over the batch's pixels (32×32 images:
    layer1 is 64×8×8 = 4 elements per pixel, layer2 128×4×4 = 2)."""
    teacher, codec, images = tiny
    taps = ["layer1", "layer2"]
    mean = [BottleneckTask(codec, teacher, beta=1.0, stages=[t]).eval() for t in taps]
    summed = BottleneckTask(codec, teacher, beta=1.0, stages=taps, reduction="sum").eval()
    with torch.no_grad():
        (m1, bpp, _), (m2, _, _) = (task.distill(images) for task in mean)
        s, s_bpp, _ = summed.distill(images)
    assert torch.allclose(s, 4 * m1 + 2 * m2, rtol=1e-6) and torch.equal(s_bpp, bpp)
    with pytest.raises(ValueError, match=r"bottleneck.reduction must be one of \('mean', 'sum'\), got 'max'"):
        BottleneckTask(codec, teacher, beta=1.0, reduction="max")


class _LossHead(Head):
    task, metric = "count", "mae"

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key, self.w = key, nn.Parameter(torch.ones(()))

    def loss(self, latent, targets, distill=None):
        return {self.key: self.w * latent.mean()}


def test_a_head_loss_named_loss_is_refused(tiny):
    _, codec, images = tiny
    frozen = Codec(latent_channels=4, hidden_channels=8, out_channels=64).freeze()
    assert set(HeadTask(frozen, _LossHead("loss_x"))((images, [{}, {}]))) == {"loss", "loss_x"}
    with pytest.raises(ValueError, match="not 'loss'"):
        HeadTask(frozen, _LossHead("loss"))((images, [{}, {}]))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("kd") / "shapes", image_size=64, num_classes=3,
                        splits={"train": 4}, max_objects=2)
    return collate([MultiTaskDataset(root, "train")[i] for i in range(4)])


@pytest.mark.parametrize("task, extra", [("detection", {"loss_cls_kd", "loss_box_bounded", "loss_hint"}),
                                         ("segmentation", {"loss_nfd"}), ("classification", {"loss_kd"})])
def test_distilled_heads_add_their_losses_and_train_their_adapters(shapes, task, extra):
    images, targets = shapes
    kw = {"detection": dict(image_size=64, fpn_channels=16, fc_dim=32, proposals=20, rois_per_image=16),
          "segmentation": {}, "classification": {}}[task]
    classes = 4 if task == "segmentation" else 3
    torch.manual_seed(0)
    frozen = Codec(latent_channels=4, hidden_channels=8, out_channels=64).freeze()
    student = HEADS.build(task, latent_channels=4, num_classes=classes, hidden_channels=8, **kw)
    reference = HEADS.build(task, latent_channels=None, num_classes=classes, **kw)
    plain = set(HeadTask(frozen, student)((images, targets)))
    task_ = HeadTask(frozen, student, teacher=reference)
    losses = task_.train()((images, targets))
    assert set(losses) == plain | extra
    losses["loss"].backward()
    if task_.adapters is not None:
        assert all(p.grad is not None for p in task_.adapters.parameters())
    assert all(p.grad is None for p in reference.parameters())


def test_the_training_state_leaves_the_teacher_out_and_goes_once_the_codec_is_written(tmp_path, shapes_root):
    from mtfc.checkpoint import load_checkpoint
    from mtfc.codec import load_codec
    from mtfc.engine import fit
    from mtfc.train import train_bottleneck

    teacher = build_teacher("resnet10", num_classes=3)
    images = torch.utils.data.Subset(MultiTaskDataset(shapes_root, "train"), range(4))
    task = BottleneckTask(Codec(latent_channels=4, hidden_channels=8, out_channels=64), teacher, beta=1.0)
    fit(task, images, out_dir=tmp_path / "cut", epochs=1, batch_size=2, max_steps=1, collate_fn=collate, progress=False)
    state = load_checkpoint(tmp_path / "cut" / "last.pt")["task"]
    assert sorted(state) == sorted(k for k in task.state_dict() if not k.startswith("teacher."))
    key = {"sha256": "0" * 64, "inputs": {"stage": "bottleneck"}}
    path = train_bottleneck(images, None, teacher, arch="resnet10", beta=1.0, out_dir=tmp_path / "codec",
                            codec={"latent_channels": 4, "hidden_channels": 8}, epochs=1, batch_size=2, max_steps=1,
                            key=key, progress=False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["codec.pt", "log.jsonl", "tb"]
    assert load_codec(path).meta["key"] == key
