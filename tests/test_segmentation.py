"""heads/segmentation.py: the MMSeg backbone, the segmentation head contract, training, IoUMetric."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_codec
from mmseg.registry import MODELS

from heads.segmentation import MTFCLatentResNet, SegmentationEvaluator, SegmentationHead
from mtfc.data import MultiTaskDataset, build_dataset, collate, make_dataset
from mtfc.data.testing import write_real_layouts
from mtfc.head import HEADS, Head, geometry_of
from mtfc.model import MultiTaskModel
from mtfc.teacher import build_teacher
from mtfc.train import train_head

SIZE, NUM_CLASSES = 32, 3  # dataset classes; the head predicts NUM_CLASSES + 1 (background)
TINY = {"latent_channels": 8, "num_classes": NUM_CLASSES + 1, "hidden_channels": 16, "channels": 16}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("seg") / "shapes", image_size=SIZE, num_classes=NUM_CLASSES,
                        splits={"train": 8, "val": 8}, seed=0)


@pytest.fixture(scope="module")
def train_set(root):
    return MultiTaskDataset(root, "train")


@pytest.fixture(scope="module")
def val_set(root):
    return MultiTaskDataset(root, "val")


def batch(dataset, n: int) -> tuple[torch.Tensor, list[dict]]:
    return collate([dataset[i] for i in range(n)])


# ------------------------------------------------------------------------------------------ backbone
def test_backbone_is_an_mmseg_model_with_stage_features():
    assert MODELS.get("MTFCLatentResNet") is MTFCLatentResNet
    net = MODELS.build({"type": "MTFCLatentResNet", "latent_channels": 8, "hidden_channels": 16})
    feats = net(torch.randn(2, 8, 8, 8))                       # ŷ of a 32x32 image
    assert isinstance(feats, tuple)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    reference = MODELS.build({"type": "MTFCLatentResNet", "latent_channels": None})
    assert [f.shape for f in reference(torch.rand(2, 3, 32, 32))] == [f.shape for f in feats]


def test_bottleneck_backbone_dilates_and_basic_blocks_refuse():
    net = MTFCLatentResNet(8, arch="resnet50", hidden_channels=16, dilated=True)
    feats = net(torch.randn(1, 8, 8, 8))
    assert [tuple(f.shape) for f in feats] == [(1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 4, 4), (1, 2048, 4, 4)]
    assert net.strides == {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    with pytest.raises(ValueError, match="BasicBlock"):
        MTFCLatentResNet(8, arch="resnet18", dilated=True)


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("decode_head", ["fcn", "aspp"])
def test_head_contract(decode_head, train_set):
    torch.manual_seed(0)
    head = HEADS.build("segmentation", decode_head=decode_head, **TINY)
    assert isinstance(head, SegmentationHead) and isinstance(head, Head)
    assert (head.task, head.metric, head.required_targets) == ("segmentation", "mIoU", ("sem_seg",))
    assert type(head.decode_head).__name__ == {"fcn": "FCNHead", "aspp": "ASPPHead"}[decode_head]
    images, targets = batch(train_set, 2)
    latent = torch.randn(2, 8, SIZE // 4, SIZE // 4)

    losses = head.train()(latent, targets)
    assert set(losses) == {"loss_ce"}
    assert all(v.dim() == 0 and v.requires_grad and torch.isfinite(v) for v in losses.values())

    preds = head.eval()(latent, targets)
    assert len(preds) == 2
    for p in preds:
        assert p.shape == (SIZE, SIZE) and p.dtype == torch.int64
        assert 0 <= int(p.min()) and int(p.max()) < NUM_CLASSES + 1
    with pytest.raises(ValueError, match="the segmentation head needs one geometry record per image"):
        head(latent, None)  # each image's size comes from its record, never guessed from the latent


def test_loss_is_mmseg_cross_entropy_over_non_ignored_pixels(train_set):
    head = SegmentationHead(**TINY).train()
    _, targets = batch(train_set, 2)
    targets[0]["sem_seg"] = targets[0]["sem_seg"].clone()
    targets[0]["sem_seg"][: SIZE // 2] = 255                   # ignored rows
    latent = torch.randn(2, 8, SIZE // 4, SIZE // 4)
    torch.manual_seed(1)
    loss = head(latent, targets)["loss_ce"]
    torch.manual_seed(1)                                       # the same dropout draw
    logits = F.interpolate(head.decode_head(head.backbone(latent)), size=(SIZE, SIZE), mode="bilinear")
    expected = F.cross_entropy(logits, torch.stack([t["sem_seg"] for t in targets]), ignore_index=255)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_input_is_refused(train_set):
    with pytest.raises(ValueError, match="decode_head"):
        SegmentationHead(**{**TINY, "decode_head": "pspnet"})
    with pytest.raises(ValueError, match="background"):
        SegmentationHead(**{**TINY, "num_classes": 1})
    head = SegmentationHead(**TINY).train()
    latent = torch.randn(1, 8, 8, 8)
    with pytest.raises(KeyError, match="sem_seg"):
        head(latent, [{"image_id": 7, "label": 0}])
    with pytest.raises(ValueError, match="targets"):
        head(latent, None)
    with pytest.raises(ValueError, match="dataset has 3 classes"):
        SegmentationHead(**{**TINY, "num_classes": 3}).build_evaluator(train_set)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("decode_head", ["fcn", "aspp"])
def test_training_reduces_the_loss(decode_head, train_set, frozen_codec):
    images, targets = batch(train_set, 4)
    latent = frozen_codec.quantize(images)
    torch.manual_seed(0)
    head = SegmentationHead(**{**TINY, "decode_head": decode_head}).train()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = sum(head(latent, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_head_leaves_the_frozen_codec_untouched(train_set, val_set, tmp_path, frozen_codec):
    images, _ = batch(val_set, 2)
    state = {k: v.clone() for k, v in frozen_codec.state_dict().items()}
    streams = frozen_codec.encode(images)
    model = MultiTaskModel(frozen_codec)
    torch.manual_seed(0)
    head = model.attach("seg", HEADS.build("segmentation", **TINY))
    head.init_from_codec(frozen_codec)
    assert all(torch.equal(a, b) for a, b in zip(head.backbone.decoder.state_dict().values(),
                                                 frozen_codec.decoder.state_dict().values()))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    history = train_head(model, "seg", train_set, out_dir=tmp_path, val_set=val_set, epochs=1, batch_size=4,
                         collate_fn=collate, progress=False)
    assert 0.0 <= history["val"]["mIoU"] <= 100.0
    assert frozen_codec.state_dict().keys() == state.keys()
    assert all(torch.equal(frozen_codec.state_dict()[k], v) for k, v in state.items())
    assert frozen_codec.encode(images) == streams
    assert any(not torch.equal(head.state_dict()[k], v) for k, v in before.items() if v.is_floating_point())

    head.eval()
    again = MultiTaskModel(frozen_codec)
    again.load_head("seg", tmp_path / "head.pt").eval()        # rebuilt from the registry spec
    assert all(torch.equal(a, b) for a, b in zip(model(streams)["seg"], again(streams)["seg"]))


@pytest.mark.parametrize("kind", ["factorized", "hyperprior"])
def test_bitstreams_and_images_give_identical_masks(kind, val_set):
    codec = tiny_codec(kind)
    images, targets = batch(val_set, 3)
    model = MultiTaskModel(codec)
    torch.manual_seed(0)
    model.attach("seg", SegmentationHead(**{**TINY, "decode_head": "aspp"}))
    model.eval()
    from_streams = model(codec.encode(images), targets)["seg"]
    from_images = model(images)["seg"]
    assert len(from_streams) == 3
    assert all(torch.equal(a, b) for a, b in zip(from_streams, from_images))


def test_reference_segmenter_runs_on_images(train_set):
    images, targets = batch(train_set, 2)
    head = SegmentationHead(None, NUM_CLASSES + 1, channels=16)
    teacher = build_teacher("resnet18", NUM_CLASSES)
    head.init_from_teacher(teacher)
    for name in ("layer2", "layer4"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(head.backbone, name).state_dict().values(),
                                                     getattr(teacher, name).state_dict().values()))
    assert torch.equal(head.backbone.decoder.conv1.weight, teacher.conv1.weight)
    assert set(head.train()(images, targets)) == {"loss_ce"}
    preds = head.eval()(images, geometry_of(targets))
    assert [p.shape for p in preds] == [(SIZE, SIZE)] * 2


def test_a_non_square_image_is_predicted_and_scored_at_its_original_size(tmp_path, frozen_codec):
    """ADE20K's 24x16 (WxH) file, evaluated keeping its aspect: fed 32x21 padded to 32x24 (the codec's 4),
    predicted and scored at 24x16 against the file's label map."""
    ade = write_real_layouts(tmp_path, corrupt=False)["ade20k"]
    val = build_dataset({"type": "ade20k", "root": str(ade), "image_size": 32, "resize": "keep_aspect"}, "val",
                        size_divisibility=frozen_codec.size_divisibility)
    images, targets = collate([val[0]])
    assert frozen_codec.size_divisibility == 4 and images.shape == (1, 3, 24, 32)
    assert targets[0]["content_size"] == (21, 32) and targets[0]["sem_seg"].shape == (16, 24)
    head = SegmentationHead(**{**TINY, "num_classes": 151}).eval()
    (pred,) = head(frozen_codec.quantize(images), geometry_of(targets))
    assert pred.shape == (16, 24)
    evaluator = head.build_evaluator(val)
    evaluator.process(targets, [pred])
    labelled = targets[0]["sem_seg"] != 255
    assert evaluator.evaluate()["aAcc"] == pytest.approx(
        100 * float((pred[labelled] == targets[0]["sem_seg"][labelled]).float().mean()), abs=0.01)


# ------------------------------------------------------------------------------------------ IoUMetric
def test_iou_metric_on_the_bundled_val_split(val_set, frozen_codec):
    head = SegmentationHead(**TINY).eval()
    evaluator = head.build_evaluator(val_set)
    classes = ("background", *val_set.class_names)
    gts = []
    for i in range(0, len(val_set), 4):
        images, targets = batch(torch.utils.data.Subset(val_set, range(i, i + 4)), 4)
        evaluator.process(targets, head(frozen_codec.quantize(images), targets))
        gts += [t["sem_seg"] for t in targets]
    result = evaluator.evaluate()
    assert {"mIoU", "aAcc"} <= set(result) and set(result) >= {f"IoU.{c}" for c in classes}
    assert all(isinstance(v, float) for v in result.values())
    assert 0.0 <= result["mIoU"] <= 100.0

    evaluator.reset()
    evaluator.process([{"sem_seg": g} for g in gts], gts)
    perfect = evaluator.evaluate()
    assert perfect["mIoU"] == perfect["aAcc"] == 100.0

    evaluator.reset()                                          # everything predicted as background
    evaluator.process([{"sem_seg": g} for g in gts], [torch.zeros_like(g) for g in gts])
    labels = torch.stack(gts).numpy()
    valid = labels != 255
    present = [k for k in range(1, NUM_CLASSES + 1) if (labels == k).any()]
    background_iou = (labels == 0).sum() / valid.sum()
    expected = 100 * np.mean([background_iou] + [0.0] * len(present))
    result = evaluator.evaluate()
    assert result["mIoU"] == pytest.approx(expected, abs=0.01)
    assert result["IoU.background"] == pytest.approx(100 * background_iou, abs=0.01)


def test_evaluator_checks_its_input():
    evaluator = SegmentationEvaluator(["background", "a"])
    with pytest.raises(RuntimeError, match="before any process"):
        evaluator.evaluate()
    with pytest.raises(ValueError, match="shape"):
        evaluator.process([{"sem_seg": torch.zeros(4, 4, dtype=torch.long), "image_id": 3}],
                          [torch.zeros(4, 5, dtype=torch.long)])
