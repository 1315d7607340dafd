"""Semantic segmentation on the shared latent with MMSegmentation 1.x (its registry, decode heads,
loss and ``IoUMetric``).

ŷ → :class:`MTFCLatentResNet` (a backbone registered in MMSeg's ``MODELS``: the head's own decoder +
ResNet stages initialised from the teacher) → the tuple of stage features MMSeg decode heads consume
→ ``ASPPHead`` (DeepLabV3) or ``FCNHead`` with MMSeg's ``CrossEntropyLoss`` → per-pixel logits,
upsampled to the input size by the decode head's ``predict``.

Pixel normalisation happens in exactly one place per path and never here: the codec normalises
before encoding, and the reference segmenter (``latent_channels=None``) normalises in
:class:`~mtfc.head.LatentResNet`'s pixel stem (:func:`mtfc.teacher.normalize`). MMSeg's
``SegDataPreProcessor`` mean/std is therefore not used.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from mmengine.model import initialize
from mmengine.structures import PixelData
from mmseg.evaluation import IoUMetric
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import nn

from mtfc.distill import nfd_loss
from mtfc.head import (HEADS, Distillation, Head, HeadContext, ImageGeometry, LatentResNet, Targets, image_sizes,
                       trunk_kwargs)
from mtfc.teacher import STAGES, stage_channels

IGNORE_INDEX = 255

#: The decode heads to choose from, as MMSeg configs (inputs, width and classes are added per head):
#: ``"fcn"`` is MMSeg's HRNet-style FCN head (1×1 convolutions on every stage resized to stride 4),
#: ``"aspp"`` DeepLabV3's ASPP head (MMSeg's default rates, which suit small inputs).
DECODE_HEADS: dict[str, dict[str, Any]] = {
    "fcn": {"type": "FCNHead", "num_convs": 1, "kernel_size": 1, "concat_input": False},
    "aspp": {"type": "ASPPHead", "dilations": (1, 6, 12, 18)},
}


def uses_bottleneck(arch: str) -> bool:
    """Whether a torchvision ResNet is built from Bottleneck blocks (they expand ``layer1`` to 256 channels)."""
    return stage_channels(arch)["layer1"] != 64


@MODELS.register_module()
class MTFCLatentResNet(LatentResNet):
    """MMSeg backbone: ŷ (or images, with ``latent_channels=None``) → ``(layer1, layer2, layer3, layer4)``.

    Strides 4, 8, 16, 32; with ``dilated=True`` ``layer3`` and ``layer4`` keep stride 8 and dilate
    instead (DeepLabV3's output stride 8), which torchvision supports only for Bottleneck ResNets
    (resnet50/101).
    """

    def __init__(self, latent_channels: int | None, arch: str = "resnet18", hidden_channels: int = 96,
                 dilated: bool = False) -> None:
        if dilated and not uses_bottleneck(arch):
            raise ValueError(f"{arch} is built from BasicBlocks, which torchvision cannot dilate; "
                             f"use dilated=False (strides 4/8/16/32) or a Bottleneck ResNet (resnet50/101)")
        super().__init__(latent_channels, arch, hidden_channels, (False, dilated, dilated))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = super().forward(x)
        return tuple(feats[s] for s in self.stages)


@HEADS.register("segmentation")
class SegmentationHead(Head):
    """:class:`MTFCLatentResNet` → an MMSeg decode head (``decode_head``: ``"fcn"`` or ``"aspp"``).

    What the decode head reads (MMSeg's ``in_index`` / ``input_transform``):

    * ``"fcn"``: every stage, resized to stride 4 and concatenated (``"resize_concat"``); light, and
      the masks keep stride-4 detail.
    * ``"aspp"``: output stride 8, as DeepLabV3. Bottleneck ResNets (resnet50/101) dilate ``layer3``
      and ``layer4`` and the head reads ``layer4``; BasicBlock ResNets (resnet18/34) cannot be
      dilated, so the head reads ``layer2..layer4`` resized to stride 8 and concatenated.

    ``num_classes`` counts background (dataset classes + 1); target ``sem_seg`` uses 0 for
    background, k+1 for class k and 255 for ignored pixels. Training returns MMSeg's loss dict
    (``{"loss_ce": ...}``); eval returns one (H0, W0) int64 label map per image at its record's
    ``original_size`` (:class:`~mtfc.head.ImageGeometry`), compared with the file's label map.

    Distilled from the reference segmenter (``distill: true`` in its config), it adds normalized
    feature distillation on the four backbone stages with weight ``nfd`` (:func:`mtfc.distill.nfd_loss`).
    """

    task = "segmentation"
    metric = "mIoU"
    required_targets = ("sem_seg",)

    @classmethod
    def from_config(cls, kwargs: dict[str, Any], ctx: HeadContext) -> dict[str, Any]:
        """See :func:`~mtfc.head.trunk_kwargs`."""
        return trunk_kwargs(kwargs, ctx, extra_classes=1)  # + background

    def __init__(self, latent_channels: int | None, num_classes: int, arch: str = "resnet18",
                 hidden_channels: int = 96, decode_head: str = "fcn", channels: int = 64, nfd: float = 1.0) -> None:
        super().__init__()
        self.nfd = nfd
        if decode_head not in DECODE_HEADS:
            raise ValueError(f"unknown decode_head {decode_head!r}; choose from {sorted(DECODE_HEADS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts background too (dataset classes + 1), got {num_classes}")
        self.num_classes = num_classes
        dilated = decode_head == "aspp" and uses_bottleneck(arch)
        self.backbone = MODELS.build({"type": "MTFCLatentResNet", "latent_channels": latent_channels, "arch": arch,
                                      "hidden_channels": hidden_channels, "dilated": dilated})
        widths = [self.backbone.channels[s] for s in STAGES]
        if dilated:
            inputs: dict[str, Any] = {"in_channels": widths[3], "in_index": 3}
        else:
            first = 0 if decode_head == "fcn" else 1
            inputs = {"in_channels": widths[first:], "in_index": list(range(first, len(widths))),
                      "input_transform": "resize_concat"}
        self.decode_head = MODELS.build({
            **DECODE_HEADS[decode_head], **inputs, "channels": channels, "num_classes": num_classes,
            "norm_cfg": {"type": "BN", "requires_grad": True}, "align_corners": False, "ignore_index": IGNORE_INDEX,
            "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0,
                            "avg_non_ignore": True}})
        initialize(self.decode_head, self.decode_head.init_cfg)  # MMSeg's init of conv_seg, without init_weights()'s log dump

    def loss(self, latent: torch.Tensor, targets: Targets, distill: Distillation | None = None) -> dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("SegmentationHead needs targets with 'sem_seg' in training mode")
        samples = [SegDataSample(gt_sem_seg=PixelData(data=_sem_seg(t).to(latent.device)[None])) for t in targets]
        feats = self.backbone(latent)
        losses = self.decode_head.loss(feats, samples, None)
        losses = {k: v for k, v in losses.items() if k.startswith("loss")}  # drop the "acc_seg" statistic
        if distill is not None and self.nfd:
            with torch.no_grad():
                teacher = distill.model.backbone(distill.images)
            losses["loss_nfd"] = self.nfd * nfd_loss(feats, teacher, distill.adapters)
        return losses

    def predict(self, latent: torch.Tensor, images: Sequence[ImageGeometry] | None = None) -> list[torch.Tensor]:
        """One label map per image at its record's ``original_size`` (H0, W0), as MMSeg's
        ``postprocess_result``: the logits are upsampled to the input canvas, each image's
        ``content_size`` is cropped from the top-left (the padding is dropped) and resized bilinearly to
        the original size before the argmax."""
        canvas = self._canvas(latent)
        sizes = image_sizes(images, len(latent), "the segmentation head", canvas)
        logits = self.decode_head.predict(self.backbone(latent), [{"img_shape": canvas}] * len(latent), None)
        maps = []
        for image_logits, ((h, w), original) in zip(logits, sizes):
            image_logits = image_logits[None, :, :h, :w]
            if (h, w) != original:
                image_logits = resize(image_logits, size=original, mode="bilinear",
                                      align_corners=self.decode_head.align_corners, warning=False)
            maps.append(image_logits[0].argmax(0))
        return maps

    def distill_adapters(self, teacher: nn.Module) -> nn.ModuleList | None:
        """NFD's adaptation layers: a 1×1 convolution per backbone stage (student → teacher channels)."""
        if not self.nfd:
            return None
        return nn.ModuleList(nn.Conv2d(self.backbone.channels[s], teacher.backbone.channels[s], 1) for s in STAGES)

    def _canvas(self, latent: torch.Tensor) -> tuple[int, int]:
        """The input's (H, W): the images' for a reference head, else the latent's × its stride."""
        if self.backbone.on_pixels:
            return tuple(latent.shape[-2:])
        return tuple(int(s) * self.backbone.strides["layer1"] for s in latent.shape[-2:])

    def build_evaluator(self, dataset: Any = None) -> SegmentationEvaluator:
        return SegmentationEvaluator(_class_names(dataset, self.num_classes))


class SegmentationEvaluator:
    """MMSeg's ``IoUMetric`` (mIoU, ignore index 255) over (H, W) label maps.

    ``evaluate()`` returns ``{"mIoU", "mAcc", "aAcc", "IoU.<class>"}`` in percent (``compute_metrics``
    also logs MMSeg's per-class table); classes that occur in neither the ground truth nor the
    predictions have no IoU and are left out (and out of the mean, as in MMSeg).
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = tuple(class_names)
        # (the prefix only silences IoUMetric's warning: compute_metrics, called directly, does not use it)
        self.metric = IoUMetric(ignore_index=IGNORE_INDEX, iou_metrics=["mIoU"], prefix="segmentation")
        self.metric.dataset_meta = {"classes": self.class_names}

    def reset(self) -> None:
        self.metric.results.clear()

    def process(self, targets: Targets, predictions: list[torch.Tensor]) -> None:
        samples = []
        for target, pred in zip(targets, predictions, strict=True):
            gt = _sem_seg(target)
            pred = torch.as_tensor(pred).cpu()
            if pred.shape != gt.shape:
                raise ValueError(f"prediction of shape {tuple(pred.shape)} for a 'sem_seg' of shape {tuple(gt.shape)} "
                                 f"(image {target.get('file_name', target.get('image_id', '?'))})")
            samples.append(SegDataSample(pred_sem_seg=PixelData(data=pred[None]),
                                         gt_sem_seg=PixelData(data=gt[None])).to_dict())
        self.metric.process({}, samples)

    def evaluate(self) -> dict[str, float]:
        results = self.metric.results
        if not results:
            raise RuntimeError("SegmentationEvaluator.evaluate() before any process()")
        metrics = {k: float(v) for k, v in self.metric.compute_metrics(results).items()}
        totals = [sum(r[i] for r in results) for i in range(4)]  # intersect, union, pred, label areas
        per_class = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])["IoU"]
        for name, iou in zip(self.class_names, np.asarray(per_class, dtype=float)):
            if not np.isnan(iou):
                metrics[f"IoU.{name}"] = round(float(iou) * 100, 2)
        return metrics


def _sem_seg(target: dict[str, Any]) -> torch.Tensor:
    if "sem_seg" not in target:
        raise KeyError(f"target of image {target.get('file_name', target.get('image_id', '?'))} has no 'sem_seg' "
                       f"(keys: {sorted(target)}); the segmentation head needs a dataset with label maps")
    return torch.as_tensor(target["sem_seg"], dtype=torch.long).cpu()


def _class_names(dataset: Any, num_classes: int) -> tuple[str, ...]:
    """``("background", *dataset classes)``, looking through wrappers such as ``Subset``."""
    while dataset is not None and not hasattr(dataset, "class_names") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    names = getattr(dataset, "class_names", None)
    if names is None:
        return ("background", *(f"class_{k}" for k in range(num_classes - 1)))
    if len(names) + 1 != num_classes:
        raise ValueError(f"the dataset has {len(names)} classes, the head predicts {num_classes} "
                         f"(expected dataset classes + 1 for background)")
    return ("background", *names)
