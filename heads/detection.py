"""Object detection on the shared latent: Detectron2's Faster R-CNN (FPN) with a backbone that starts from ŷ.

The server decodes the bitstream to ŷ (stride 4); the head's :class:`LatentBackbone` turns it into
``layer1..layer4`` features (mtfc's :class:`~mtfc.head.LatentResNet`: decoder + the teacher's ResNet
stages) and Detectron2's :class:`~detectron2.modeling.backbone.FPN` builds ``p2..p6`` on top. Their
builder is registered in Detectron2's ``BACKBONE_REGISTRY`` (``build_mtfc_latent_fpn_backbone``), so the
detector itself is an ordinary ``GeneralizedRCNN`` built by ``detectron2.modeling.build_model``
(RPN + ``StandardROIHeads`` + ``FastRCNNConvFCHead``) from a Detectron2 config. The head calls the
detector's components itself (backbone on ŷ, proposal generator, ROI heads), because
``GeneralizedRCNN.forward`` expects pixels.

Pixel statistics: Detectron2 normally normalises pixels (``MODEL.PIXEL_MEAN``/``PIXEL_STD``, BGR) in
``GeneralizedRCNN.preprocess_image``. This head never calls it: on ŷ the codec has already
normalised the image (:func:`mtfc.teacher.normalize` inside :meth:`mtfc.Codec.quantize`), and the
reference detector on pixels (``latent_channels=None``) normalises in its trunk with the same
function. The config sets the Detectron2 constants to identity (mean 0, std 1, RGB) to say so.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, get_cfg
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from mtfc.codec import Codec
from mtfc.distill import bounded_regression, hint_loss, weighted_soft_ce
from mtfc.head import (HEADS, Distillation, Head, HeadContext, ImageGeometry, LatentResNet, Targets, image_sizes,
                       trunk_kwargs)
from mtfc.teacher import STAGES

with warnings.catch_warnings():  # detectron2.model_zoo imports pkg_resources, which setuptools deprecates
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from detectron2 import model_zoo

#: The Detectron2 model-zoo config every detection head starts from (then :func:`detectron2_config` overrides).
BASE_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
#: The keys :class:`DetectionEvaluator` returns: COCO box AP in percent, as Detectron2 reports it.
AP_KEYS = ("AP", "AP50", "AP75")


class LatentBackbone(Backbone):
    """Detectron2 bottom-up backbone on ŷ (or, with ``latent_channels=None``, on RGB images in [0, 1]).

    Outputs ``layer1..layer4`` of a :class:`~mtfc.head.LatentResNet`; ``output_shape()`` strides are
    relative to the input *image* (4, 8, 16, 32), whichever of ŷ or pixels the backbone consumes.
    """

    def __init__(self, latent_channels: int | None, arch: str = "resnet18", hidden_channels: int = 96) -> None:
        super().__init__()
        self.trunk = LatentResNet(latent_channels, arch, hidden_channels)
        self._out_features = list(self.trunk.stages)
        self._out_feature_channels = dict(self.trunk.channels)
        self._out_feature_strides = dict(self.trunk.strides)

    @property
    def input_stride(self) -> int:
        """Image pixels per input position: 4 on ŷ, 1 on pixels."""
        return 1 if self.trunk.on_pixels else Codec.latent_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.trunk(x)


@BACKBONE_REGISTRY.register()
def build_mtfc_latent_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """:class:`LatentBackbone` + Detectron2's FPN (``LastLevelMaxPool`` adds ``p6``), as
    ``build_resnet_fpn_backbone`` does for pixels.

    Reads ``cfg.MODEL.MTFC.{LATENT_CHANNELS, ARCH, HIDDEN_CHANNELS}`` and ``cfg.MODEL.FPN``. The
    input is ŷ, so ``input_shape`` (Detectron2 derives it from ``len(MODEL.PIXEL_MEAN)``) is unused.
    """
    mtfc = cfg.MODEL.MTFC
    return FPN(bottom_up=LatentBackbone(mtfc.LATENT_CHANNELS, mtfc.ARCH, mtfc.HIDDEN_CHANNELS),
               in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def default_anchor_sizes(image_size: int | Sequence[int]) -> list[int]:
    """One anchor size per FPN level (p2..p6): Detectron2's COCO sizes (32..512) for images of 256 px
    and more, halved per halving of the shorter side (64 px → 8..128), never below 4."""
    side = min(_size_hw(image_size))
    base = min(32, max(4, 2 ** round(math.log2(side / 8))))
    return [base * 2**i for i in range(5)]


def detectron2_config(num_classes: int, latent_channels: int | None, *, arch: str = "resnet18",
                      hidden_channels: int = 96, image_size: int | Sequence[int] = 64, fpn_channels: int = 128,
                      fc_dim: int = 256, proposals: int = 100, rois_per_image: int = 64,
                      anchor_sizes: Sequence[int] | None = None, overrides: Sequence[Any] | None = None) -> CfgNode:
    """The Detectron2 config of a detection head: :data:`BASE_CONFIG` from the model zoo, with the
    mtfc backbone (``cfg.MODEL.MTFC``), ``num_classes``, no pretrained weights, identity pixel
    statistics (see the module docstring), and:

    * ``anchor_sizes``: one size per FPN level, default :func:`default_anchor_sizes` of ``image_size``;
    * speed knobs sized for small images (Detectron2's COCO values in brackets): ``fpn_channels``
      (256), ``fc_dim`` of the box head's two FC layers (1024), ``proposals`` kept per image after
      the RPN's NMS (1000; twice as many before it), ``rois_per_image`` sampled for the box losses (512);
    * finally ``overrides``, a flat ``[KEY, value, ...]`` list for ``CfgNode.merge_from_list``.
    """
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(BASE_CONFIG))
    cfg.MODEL.MTFC = CfgNode({"LATENT_CHANNELS": latent_channels, "ARCH": arch, "HIDDEN_CHANNELS": hidden_channels})
    cfg.MODEL.BACKBONE.NAME = build_mtfc_latent_fpn_backbone.__name__
    cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"  # built on the CPU like any nn.Module; .to(device) moves it
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], "RGB"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in (anchor_sizes or default_anchor_sizes(image_size))]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 2 * proposals
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = proposals
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = rois_per_image
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = fc_dim
    if overrides:
        try:
            cfg.merge_from_list(list(overrides))
        except (AssertionError, KeyError, ValueError) as e:  # yacs reports bad keys with a bare assert
            raise ValueError(f"bad Detectron2 config overrides {list(overrides)}: {e}") from None
    return cfg


@dataclass(frozen=True)
class DetectionKD:
    """Weights of Chen et al.'s detection distillation (their defaults): ``mu`` splits the box classifier's
    loss between the labels and the teacher's soft labels (at ``temperature``, background weighted
    ``bg_weight``); ``bounded`` weighs the teacher-bounded regression (``margin`` m); ``hint`` the FPN hint loss."""

    mu: float = 0.5
    temperature: float = 1.0
    bg_weight: float = 1.5
    bounded: float = 0.5
    margin: float = 0.0
    hint: float = 0.5


@HEADS.register("detection")
class DetectionHead(Head):
    """Faster R-CNN (Detectron2, FPN) on ŷ: :class:`LatentBackbone` + FPN → RPN → ``StandardROIHeads``.

    :meth:`loss` returns Detectron2's losses (``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``,
    ``loss_box_reg``; distilled, also ``loss_cls_kd``, ``loss_box_bounded``, ``loss_hint``). :meth:`predict`: one ``{"instances": Instances}`` per image — Detectron2's
    model output, with ``pred_boxes`` (XYXY pixels of the *original* image, ``Instances.image_size``
    its size), ``scores`` and ``pred_classes`` (0..K-1) — which :class:`DetectionEvaluator` scores.
    Each image's sizes come from its record (:class:`~mtfc.head.ImageGeometry`). Any input size works:
    the head zero-pads the input bottom/right to multiples of 32 pixels (the FPN's ``size_divisibility``),
    boxes are clipped to the image's content and then scaled to its original size.

    Args:
        latent_channels: channels of ŷ; ``None`` builds the reference detector on uncompressed images
            (B, 3, H, W) in [0, 1]: same architecture, the teacher's stem and ``layer1`` in place of the decoder.
        num_classes: object classes (the dataset's ``num_classes``).
        arch, hidden_channels: the trunk (:class:`~mtfc.head.LatentResNet`), initialised from the
            teacher (:meth:`~mtfc.head.Head.init_from_teacher`) and the codec's decoder.
        image_size: training image size (int or [H, W]); sets the anchor sizes.
        fpn_channels, fc_dim, proposals, rois_per_image, anchor_sizes, overrides: see :func:`detectron2_config`.
        kd: the weights of the distillation from the reference detector (``distill: true`` in its
            config), as :class:`DetectionKD`'s fields.
    """

    task = "detection"
    metric = "AP"
    required_targets = ("boxes", "classes", "image_size")

    @classmethod
    def from_config(cls, kwargs: dict[str, Any], ctx: HeadContext) -> dict[str, Any]:
        """:func:`~mtfc.head.trunk_kwargs`, with the dataset's image size as the default ``image_size``."""
        resolved = trunk_kwargs(kwargs, ctx)
        if ctx.image_size is not None:
            resolved.setdefault("image_size", list(ctx.image_size))
        return resolved

    def __init__(self, latent_channels: int | None, num_classes: int, arch: str = "resnet18",
                 hidden_channels: int = 96, image_size: int | Sequence[int] = 64, fpn_channels: int = 128,
                 fc_dim: int = 256, proposals: int = 100, rois_per_image: int = 64,
                 anchor_sizes: Sequence[int] | None = None, overrides: Sequence[Any] | None = None,
                 kd: dict[str, float] | None = None) -> None:
        super().__init__()
        self.kd = DetectionKD(**(kd or {}))
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.in_channels = 3 if latent_channels is None else latent_channels
        self.cfg = detectron2_config(num_classes, latent_channels, arch=arch, hidden_channels=hidden_channels,
                                     image_size=image_size, fpn_channels=fpn_channels, fc_dim=fc_dim,
                                     proposals=proposals, rois_per_image=rois_per_image,
                                     anchor_sizes=anchor_sizes, overrides=overrides)
        self.detector = build_model(self.cfg)

    def predict(self, latent: torch.Tensor, images: Sequence[ImageGeometry] | None = None) -> list[dict[str, Instances]]:
        """One ``{"instances": Instances}`` per image in the original image's coordinates: the detector
        sees each image's content (its record's ``content_size``) and Detectron2's ``detector_postprocess``
        scales the boxes to ``original_size`` (and clips them to it), as ``GeneralizedRCNN`` does."""
        latent, image_list, originals = self._image_list(latent, images)
        det = self.detector
        features = det.backbone(latent)
        proposals, _ = det.proposal_generator(image_list, features, None)
        results, _ = det.roi_heads(image_list, features, proposals, None)
        return [{"instances": detector_postprocess(r, *original)} for r, original in zip(results, originals)]

    def loss(self, latent: torch.Tensor, targets: Targets, distill: Distillation | None = None) -> dict[str, torch.Tensor]:
        gt = self._gt_instances(targets, latent.device)
        latent, images, _ = self._image_list(latent, targets)
        det = self.detector
        features = det.backbone(latent)
        with EventStorage():  # Detectron2's RPN and ROI heads log training statistics to the current storage
            proposals, proposal_losses = det.proposal_generator(images, features, gt)
            if distill is None:
                _, detector_losses = det.roi_heads(images, features, proposals, gt)
            else:
                detector_losses = self._distilled_roi_losses(features, proposals, gt, distill)
        return {**proposal_losses, **detector_losses}

    def _distilled_roi_losses(self, features: dict[str, torch.Tensor], proposals: list[Instances],
                              gt: list[Instances], distill: Distillation) -> dict[str, torch.Tensor]:
        """Chen et al. (NeurIPS 2017) on Detectron2's box head: the ROI head's own losses on the sampled
        proposals, with ``loss_cls`` weighted by ``μ`` and joined by the teacher's soft labels
        (class-weighted, weight 1 − μ), the teacher-bounded regression and the FPN hint loss."""
        kd, rh = self.kd, self.detector.roi_heads
        teacher = distill.model.detector
        proposals = rh.label_and_sample_proposals(proposals, gt)
        boxes = [p.proposal_boxes for p in proposals]
        scores, deltas = rh.box_predictor(rh.box_head(rh.box_pooler([features[f] for f in rh.box_in_features], boxes)))
        losses = rh.box_predictor.losses((scores, deltas), proposals)
        with torch.no_grad():
            t_features = teacher.backbone(_pad_to(distill.images, teacher.backbone.size_divisibility))
            trh = teacher.roi_heads
            t_scores, t_deltas = trh.box_predictor(trh.box_head(trh.box_pooler(
                [t_features[f] for f in trh.box_in_features], boxes)))
        weights = torch.ones(scores.shape[1], device=scores.device)
        weights[-1] = kd.bg_weight  # Detectron2's background is the last class
        losses["loss_cls"] = kd.mu * losses["loss_cls"]
        losses["loss_cls_kd"] = (1 - kd.mu) * weighted_soft_ce(scores, t_scores, weights, kd.temperature)
        classes = torch.cat([p.gt_classes for p in proposals])
        fg = (classes >= 0) & (classes < self.num_classes)
        if fg.any():
            target = rh.box_predictor.box2box_transform.get_deltas(
                torch.cat([b.tensor for b in boxes])[fg], torch.cat([p.gt_boxes.tensor for p in proposals])[fg])
            cols = (4 * classes[fg])[:, None] + torch.arange(4, device=classes.device)
            pick = torch.arange(int(fg.sum()), device=classes.device)[:, None]
            losses["loss_box_bounded"] = kd.bounded * bounded_regression(
                deltas[fg][pick, cols], t_deltas[fg][pick, cols], target, kd.margin)
        else:
            losses["loss_box_bounded"] = deltas.sum() * 0.0
        levels = list(features)
        losses["loss_hint"] = kd.hint * hint_loss([features[k] for k in levels], [t_features[k] for k in levels],
                                                  distill.adapters)
        return losses

    def distill_adapters(self, teacher: nn.Module) -> nn.ModuleList:
        """Hint adaptation layers: a 1×1 convolution per FPN level (student → teacher channels)."""
        shapes, t_shapes = self.detector.backbone.output_shape(), teacher.detector.backbone.output_shape()
        return nn.ModuleList(nn.Conv2d(shapes[k].channels, t_shapes[k].channels, 1) for k in shapes)

    def _image_list(self, latent: torch.Tensor,
                    images: Sequence[Any] | None) -> tuple[torch.Tensor, ImageList, list[tuple[int, int]]]:
        """``latent`` zero-padded bottom/right to the FPN's ``size_divisibility``, the Detectron2
        ``ImageList`` that holds each image's content size from its record (``images``: geometry records
        or targets, both with ``content_size``; the RPN and the ROI heads clip boxes to them), and each
        image's original size."""
        stride = self.detector.backbone.bottom_up.input_stride
        if latent.dim() != 4 or latent.shape[1] != self.in_channels:
            what = "images" if stride == 1 else "latent"
            raise ValueError(f"the detection head expects a (B, {self.in_channels}, h, w) {what}, "
                             f"got shape {tuple(latent.shape)}")
        H, W = latent.shape[-2] * stride, latent.shape[-1] * stride
        sizes = image_sizes(images, len(latent), "the detection head", (H, W))
        padded = _pad_to(latent, self.detector.backbone.size_divisibility // stride)
        # The RPN and ROI heads read only image_sizes; the tensor stands for the padded batch (no pixels here).
        image_list = ImageList(latent.new_empty((len(latent), 0, *(n * stride for n in padded.shape[-2:]))),
                               [content for content, _ in sizes])
        return padded, image_list, [original for _, original in sizes]

    def _gt_instances(self, targets: Targets | None, device: torch.device) -> list[Instances]:
        if targets is None:
            raise ValueError(f"training the detection head needs targets with {list(self.required_targets)}")
        gt = []
        for t in targets:
            missing = [k for k in self.required_targets if k not in t]
            if missing:
                raise ValueError(f"image {t.get('image_id', '?')}: detection targets lack {missing}")
            size = tuple(int(v) for v in t["image_size"])
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            classes = torch.as_tensor(t["classes"], dtype=torch.int64, device=device).reshape(-1)
            if len(boxes) != len(classes):
                raise ValueError(f"image {t.get('image_id', '?')}: {len(boxes)} boxes but {len(classes)} classes")
            if len(classes) and not 0 <= int(classes.min()) <= int(classes.max()) < self.num_classes:
                raise ValueError(f"image {t.get('image_id', '?')}: class ids {classes.tolist()} outside "
                                 f"0..{self.num_classes - 1}")
            gt.append(Instances(size, gt_boxes=Boxes(boxes), gt_classes=classes))
        return gt

    def build_evaluator(self, dataset: Any) -> DetectionEvaluator:
        """A :class:`DetectionEvaluator` on ``dataset``'s COCO file (registered with Detectron2)."""
        evaluator = DetectionEvaluator.for_dataset(dataset)
        if evaluator.num_classes != self.num_classes:
            raise ValueError(f"{evaluator.ann_file} has {evaluator.num_classes} categories, this head "
                             f"detects {self.num_classes}")
        return evaluator


class DetectionEvaluator:
    """COCO box AP of mtfc batches through Detectron2's ``COCOEvaluator`` (pycocotools).

    ``process(targets, predictions)`` turns each target into Detectron2's input (``image_id``) and hands
    the predictions over as they are: a head predicts in the coordinates of the image file the
    annotations describe (``Instances.image_size`` must be the target's ``orig_size``). ``evaluate()`` scores the processed images only and returns :data:`AP_KEYS` (percent). With no
    detection at all COCO AP is undefined (Detectron2 reports NaN); this evaluator returns 0.0 for
    each key and warns.
    """

    def __init__(self, dataset_name: str) -> None:
        from detectron2.data import MetadataCatalog

        self.dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name)
        self.ann_file, self.num_classes = meta.get("json_file"), len(meta.get("thing_classes", ()))
        self.coco = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False, output_dir=None,
                                  use_fast_impl=False)
        self.reset()

    @classmethod
    def for_dataset(cls, dataset: Any) -> DetectionEvaluator:
        """Register ``dataset``'s ``ann_file`` / ``image_root`` with Detectron2 (name derived from the
        annotation file's path) and evaluate on it; ``torch.utils.data.Subset`` s are unwrapped."""
        from mtfc.data import register_detectron2

        base = dataset
        while getattr(base, "ann_file", None) is None and hasattr(base, "dataset"):
            base = base.dataset
        if getattr(base, "ann_file", None) is None or getattr(base, "image_root", None) is None:
            raise ValueError(f"detection evaluation needs a dataset read from a COCO file (ann_file and "
                             f"image_root), got {type(dataset).__name__}")
        ann_file = Path(base.ann_file).resolve()
        name = f"mtfc_{ann_file.stem}_{hashlib.sha1(str(ann_file).encode()).hexdigest()[:10]}"
        return cls(register_detectron2(name, ann_file, base.image_root))

    def reset(self) -> None:
        self.coco.reset()
        self._image_ids: set[int] = set()
        self._detections = 0

    def process(self, targets: Targets, predictions: list[dict[str, Instances]]) -> None:
        if len(targets) != len(predictions):
            raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
        inputs, outputs = [], []
        for t, p in zip(targets, predictions):
            if "image_id" not in t:
                raise ValueError("detection evaluation needs each target's 'image_id' (its id in the COCO file)")
            if not isinstance(p, dict) or not isinstance(p.get("instances"), Instances):
                raise TypeError(f"expected predictions as {{'instances': Instances}}, got {type(p).__name__}")
            instances = p["instances"].to("cpu")
            orig = tuple(int(v) for v in t.get("orig_size", instances.image_size))
            if tuple(instances.image_size) != orig:
                raise ValueError(f"image {t['image_id']}: predictions on a {instances.image_size} image, but the "
                                 f"original is {orig}: a detection head predicts in original-image coordinates "
                                 "(detector_postprocess to the record's original_size)")
            inputs.append({"image_id": int(t["image_id"])})
            outputs.append({"instances": instances})
            self._image_ids.add(int(t["image_id"]))
            self._detections += len(instances)
        self.coco.process(inputs, outputs)

    def evaluate(self) -> dict[str, float]:
        if not self._image_ids:
            raise RuntimeError("DetectionEvaluator.evaluate() called before any process()")
        if not self._detections:
            warnings.warn(f"no detections on {len(self._image_ids)} images of {self.dataset_name}: "
                          "COCO AP is undefined, reporting 0.0", RuntimeWarning, stacklevel=2)
            return dict.fromkeys(AP_KEYS, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
            bbox = self.coco.evaluate(img_ids=sorted(self._image_ids))["bbox"]
        return {k: float(bbox[k]) for k in AP_KEYS}


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` (..., h, w) zero-padded bottom/right to multiples of ``multiple``."""
    return F.pad(x, (0, -x.shape[-1] % multiple, 0, -x.shape[-2] % multiple))


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width
