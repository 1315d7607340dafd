"""Data: the bundled multi-task dataset generator, loaders for standard formats, augmentation.

``make_dataset`` writes the bundled dataset (ImageFolder + COCO JSON + MMSeg label maps);
``build_dataset(cfg, split, train)`` reads it or a real dataset (ImageNet, COCO, ADE20K, VOC,
Cityscapes) from a config dict through the :data:`DATASETS` registry (one module per format:
``imagefolder``, ``coco``, ``mmseg_folders``, ``bundled``; shared mechanics in ``base``);
``collate`` batches items as ``(images, targets)``, ``grouped_loader`` batches an evaluation split
whose images differ in size (``resize: keep_aspect``) by size.
"""
from .base import (
    CorruptFileError,
    DatasetError,
    DatasetWarning,
    Record,
    RecordList,
    SizeGroupedBatches,
    TaskDataset,
    collate,
    grouped_loader,
    label_lut,
    palette,
    read_image,
)
from .bundled import MultiTaskDataset, mmseg_dataset_config
from .coco import CocoDetectionDataset, CocoIndex, load_coco, register_detectron2
from .imagefolder import ClassificationDataset
from .mmseg_folders import SegmentationDataset
from .preview import render_samples
from .registry import DATASETS, build_dataset
from .synthetic import LAYOUT, SHAPES, Scene, class_names, generate_scene, make_dataset
from .transforms import IGNORE_INDEX, RESIZE, SampleTransform, bbox_params, build_transforms

__all__ = [
    "ClassificationDataset", "CocoDetectionDataset", "CocoIndex", "CorruptFileError", "DATASETS", "DatasetError",
    "DatasetWarning", "MultiTaskDataset", "Record", "RecordList", "SegmentationDataset", "SizeGroupedBatches",
    "TaskDataset", "build_dataset", "collate", "grouped_loader", "label_lut", "load_coco", "mmseg_dataset_config",
    "palette", "read_image",
    "register_detectron2", "render_samples", "LAYOUT", "SHAPES", "Scene", "class_names",
    "generate_scene", "make_dataset", "IGNORE_INDEX", "RESIZE", "SampleTransform", "bbox_params", "build_transforms",
]
