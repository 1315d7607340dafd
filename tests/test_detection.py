import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, StandardROIHeads
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from heads.detection import (AP_KEYS, DetectionEvaluator, DetectionHead, LatentBackbone,
                             build_mtfc_latent_fpn_backbone, default_anchor_sizes)
from mtfc.data import MultiTaskDataset, collate, make_dataset
from mtfc.head import HEADS, geometry, geometry_of
from mtfc.model import MultiTaskModel

SIZE = 64
SMALL = dict(arch="resnet18", hidden_channels=16, image_size=SIZE, fpn_channels=32, fc_dim=64, proposals=50,
             rois_per_image=32)
LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("det") / "shapes", image_size=SIZE, num_classes=3,
                        splits={"train": 8, "val": 8}, max_objects=2)


@pytest.fixture(scope="module")
def train_set(root):
    return MultiTaskDataset(root, "train")


@pytest.fixture(scope="module")
def val_set(root):
    return MultiTaskDataset(root, "val")


def head(latent_channels=8, seed=0, **kw):
    torch.manual_seed(seed)
    return HEADS.build("detection", latent_channels=latent_channels, num_classes=3, **{**SMALL, **kw})


def batch(dataset, n):
    return collate([dataset[i] for i in range(n)])


def test_backbone_is_registered_and_reports_its_shapes(frozen_codec):
    det = head()
    assert det.cfg.MODEL.BACKBONE.NAME == "build_mtfc_latent_fpn_backbone"
    assert BACKBONE_REGISTRY.get("build_mtfc_latent_fpn_backbone") is build_mtfc_latent_fpn_backbone
    model = det.detector
    assert isinstance(model, GeneralizedRCNN) and isinstance(model.proposal_generator, RPN)
    assert isinstance(model.roi_heads, StandardROIHeads) and isinstance(model.roi_heads.box_head, FastRCNNConvFCHead)
    backbone = model.backbone
    assert isinstance(backbone.bottom_up, LatentBackbone)
    assert {k: (v.channels, v.stride) for k, v in backbone.bottom_up.output_shape().items()} == {
        "layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)}
    assert backbone.size_divisibility == 32
    latent = frozen_codec.quantize(torch.rand(2, 3, SIZE, 2 * SIZE))
    for feats, shapes in ((backbone.bottom_up(latent), backbone.bottom_up.output_shape()),
                          (backbone(latent), backbone.output_shape())):
        assert feats.keys() == shapes.keys()
        for name, spec in shapes.items():
            assert feats[name].shape == (2, spec.channels, SIZE // spec.stride, 2 * SIZE // spec.stride), name
    assert [s.stride for s in backbone.output_shape().values()] == [4, 8, 16, 32, 64]
    assert det.cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8], [16], [32], [64], [128]]
    assert default_anchor_sizes(1024) == [32, 64, 128, 256, 512]
    assert default_anchor_sizes([32, 48]) == [4, 8, 16, 32, 64]


def test_detectron2_config_overrides():
    det = head(overrides=["MODEL.RPN.NMS_THRESH", 0.6, "TEST.DETECTIONS_PER_IMAGE", 20])
    assert det.detector.proposal_generator.nms_thresh == 0.6
    assert det.detector.roi_heads.box_predictor.test_topk_per_image == 20
    assert det.cfg.MODEL.WEIGHTS == "" and det.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    with pytest.raises(ValueError, match="Non-existent key: MODEL.NO_SUCH_KEY"):
        head(overrides=["MODEL.NO_SUCH_KEY", 1])


def test_head_contract(frozen_codec, train_set):
    det = head()
    assert isinstance(det, DetectionHead)
    assert (det.task, det.metric, det.required_targets) == ("detection", "AP", ("boxes", "classes", "image_size"))
    images, targets = batch(train_set, 2)
    latent = frozen_codec.quantize(images)
    det.train()
    losses = det(latent, targets)
    assert set(losses) == LOSSES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    det.eval()
    with torch.no_grad():
        preds = det(latent, targets)
    assert len(preds) == 2
    for p in preds:
        inst = p["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (SIZE, SIZE)
        assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
        assert len(inst) > 0 and inst.pred_classes.max() < 3
        box = inst.pred_boxes.tensor
        assert (box >= 0).all() and (box[:, 2:] <= SIZE).all()


def test_bad_inputs_are_named(frozen_codec, train_set):
    det = head()
    images, targets = batch(train_set, 2)
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\) latent"):
        det(images, targets)
    with pytest.raises(ValueError, match="lack"):
        det(frozen_codec.quantize(images), [{k: v for k, v in t.items() if k != "classes"} for t in targets])
    with pytest.raises(ValueError, match="needs targets"):
        det(frozen_codec.quantize(images))


def test_sizes_off_the_fpn_grid_are_padded_and_boxes_clipped(frozen_codec, train_set):
    # 48x36 is a multiple of the codec's 4, not of the FPN's 32: the head pads ŷ itself, exactly as if it
    # had been given the padded latent and the true image size
    det = head().eval()
    images, _ = batch(train_set, 2)
    latent = frozen_codec.quantize(images[..., :48, :36])
    with torch.no_grad():
        preds = det(latent, [geometry((48, 36))] * 2)
        want = det(F.pad(latent, (0, 16 - 9, 0, 16 - 12)), [geometry((48, 36))] * 2)  # ŷ 12x9 -> 16x16
    for p, w in zip(preds, want):
        inst = p["instances"]
        assert inst.image_size == (48, 36) and len(inst) > 0
        assert torch.equal(inst.pred_boxes.tensor, w["instances"].pred_boxes.tensor)
        assert torch.equal(inst.scores, w["instances"].scores)
        box = inst.pred_boxes.tensor
        assert (box >= 0).all() and (box[:, [0, 2]] <= 36).all() and (box[:, [1, 3]] <= 48).all()


def test_training_reduces_the_loss(frozen_codec, train_set):
    det = head()
    images, targets = batch(train_set, 2)
    latent = frozen_codec.quantize(images)

    def total_loss():
        torch.manual_seed(1)  # the same anchor / proposal sampling for both measurements
        with torch.no_grad():
            return float(sum(det(latent, targets).values()))

    det.train()
    before = total_loss()
    opt = torch.optim.Adam(det.parameters(), 1e-3)
    for _ in range(10):
        loss = sum(det(latent, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert total_loss() < 0.5 * before


def test_predictions_come_back_in_original_coordinates():
    """The ROI heads answer on the content (36x48 of a 40x48 input); the head hands back boxes on the
    72x96 original: scaled x2 and clipped to it, ``Instances.image_size`` the original's."""
    det = head().eval()
    seen = []

    def roi_heads(images, features, proposals, targets=None):
        seen.append(list(images.image_sizes))
        boxes = Boxes(torch.tensor([[12.0, 6.0, 36.0, 30.0], [0.0, 0.0, 48.0, 40.0]]))
        return [Instances(images.image_sizes[0], pred_boxes=boxes, scores=torch.tensor([0.9, 0.8]),
                          pred_classes=torch.tensor([2, 0]))], {}

    det.detector.roi_heads.forward = roi_heads
    with torch.no_grad():
        (out,) = det.predict(torch.zeros(1, 8, 10, 12), [geometry((40, 48), original_size=(72, 96), content_size=(36, 48))])
    inst = out["instances"]
    assert seen == [[(36, 48)]] and inst.image_size == (72, 96)
    assert inst.pred_boxes.tensor.tolist() == [[24, 12, 72, 60], [0, 0, 96, 72]]
    assert inst.scores.tolist() == pytest.approx([0.9, 0.8]) and inst.pred_classes.tolist() == [2, 0]


@pytest.mark.parametrize("size", [SIZE, SIZE // 2])
def test_evaluator_scores_ground_truth_perfectly(root, size):
    # At half size predictions are mapped back to the annotation file's frame as the head does
    # (detector_postprocess; boxes re-tightened around the down-sampled masks then lose up to a pixel:
    # exact at IoU 0.75, not at 0.95).
    val = MultiTaskDataset(root, "val", image_size=size)
    ev = head().build_evaluator(val)
    assert isinstance(ev, DetectionEvaluator)
    ev.reset()
    for i in range(len(val)):
        _, t = val[i]
        inst = Instances(t["content_size"], pred_boxes=Boxes(t["boxes"]), scores=torch.ones(len(t["boxes"])),
                         pred_classes=t["classes"])
        ev.process([t], [{"instances": detector_postprocess(inst, *t["orig_size"])}])
        if size < SIZE and i == 0:
            with pytest.raises(ValueError, match=r"predictions on a \(32, 32\) image, but the original is \(64, 64\): "
                                                 r"a detection head predicts in original-image coordinates"):
                ev.process([t], [{"instances": inst}])
    result = ev.evaluate()
    assert set(result) == set(AP_KEYS)
    assert result["AP50"] == result["AP75"] == pytest.approx(100.0)
    assert result["AP"] == pytest.approx(100.0) or size < SIZE


def test_evaluator_on_head_predictions(frozen_codec, val_set):
    det = head().eval()
    ev = det.build_evaluator(val_set)
    ev.reset()
    images, targets = batch(val_set, len(val_set))
    with torch.no_grad():
        ev.process(targets, det(frozen_codec.quantize(images), targets))
    result = ev.evaluate()
    assert all(0.0 <= result[k] <= 100.0 for k in AP_KEYS)

    ev.reset()
    empty = [{"instances": Instances((SIZE, SIZE), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                                     pred_classes=torch.zeros(0, dtype=torch.int64))} for _ in targets]
    ev.process(targets, empty)
    with pytest.warns(RuntimeWarning, match="no detections"):
        assert ev.evaluate() == dict.fromkeys(AP_KEYS, 0.0)
    with pytest.raises(ValueError, match="COCO file"):
        det.build_evaluator([images[0]])


def test_bitstream_path_equals_image_path(frozen_codec, val_set):
    model = MultiTaskModel(frozen_codec)
    model.attach("det", head())
    model.eval()
    images, _ = batch(val_set, 3)
    from_images = model(images)["det"]
    from_streams = model(frozen_codec.encode(images))["det"]
    assert sum(len(p["instances"]) for p in from_images) > 0
    for a, b in zip(from_images, from_streams):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_train_head_leaves_the_frozen_codec_untouched(frozen_codec, train_set, val_set, tmp_path):
    from mtfc.train import train_head

    model = MultiTaskModel(frozen_codec)
    model.attach("det", head())
    images, _ = batch(val_set, 2)
    state = {k: v.clone() for k, v in frozen_codec.state_dict().items()}
    streams = frozen_codec.encode(images)
    det_before = {k: v.clone() for k, v in model.heads["det"].state_dict().items()}
    val_subset = torch.utils.data.Subset(val_set, range(4))  # the evaluator scores the images it saw
    history = train_head(model, "det", train_set, out_dir=tmp_path, epochs=1, batch_size=2, max_steps=1,
                         val_set=val_subset, progress=False)
    assert set(AP_KEYS) <= set(history["val"])
    assert all(torch.equal(v, frozen_codec.state_dict()[k]) for k, v in state.items())
    assert frozen_codec.encode(images) == streams
    assert any(not torch.equal(v, model.heads["det"].state_dict()[k]) for k, v in det_before.items())

    reloaded = MultiTaskModel(frozen_codec)
    reloaded.load_head("det", tmp_path / "head.pt")
    model.eval(), reloaded.eval()
    for a, b in zip(model(images)["det"], reloaded(images)["det"]):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_trunk_starts_from_teacher_and_codec(frozen_codec):
    from mtfc.teacher import build_teacher

    det, teacher = head(), build_teacher("resnet18", num_classes=3)
    det.init_from_teacher(teacher)
    det.init_from_codec(frozen_codec)
    trunk = det.detector.backbone.bottom_up.trunk
    assert torch.equal(trunk.layer3[0].conv1.weight, teacher.layer3[0].conv1.weight)
    assert all(torch.equal(a, b) for a, b in zip(trunk.decoder.state_dict().values(),
                                                 frozen_codec.decoder.state_dict().values()))


def test_reference_detector_runs_on_images(train_set):
    det = head(latent_channels=None)
    images, targets = batch(train_set, 2)
    det.train()
    assert set(det(images, targets)) == LOSSES
    det.eval()
    with torch.no_grad():
        preds = det(images, geometry_of(targets))
    assert len(preds) == 2 and all(p["instances"].image_size == (SIZE, SIZE) for p in preds)
