"""Data: the bundled multi-task dataset generator, loaders for standard formats, augmentation.

``make_dataset`` writes the bundled dataset (ImageFolder + COCO JSON + MMSeg label maps);
``build_dataset(cfg, split, train)`` reads it or a real dataset (ImageNet, COCO, ADE20K, VOC,
Cityscapes) from a config dict; ``collate`` batches items as ``(images, targets)``.
"""
from .datasets import (
    ClassificationDataset,
    CocoDetectionDataset,
    CocoIndex,
    DatasetError,
    MultiTaskDataset,
    Record,
    SegmentationDataset,
    TaskDataset,
    build_dataset,
    collate,
    label_lut,
    load_coco,
    mmseg_dataset_config,
    palette,
    read_image,
    register_detectron2,
)
from .preview import render_samples
from .synthetic import LAYOUT, SHAPES, Scene, class_names, generate_scene, make_dataset
from .transforms import IGNORE_INDEX, SampleTransform, bbox_params, build_transforms

__all__ = [
    "ClassificationDataset", "CocoDetectionDataset", "CocoIndex", "DatasetError", "MultiTaskDataset", "Record",
    "SegmentationDataset", "TaskDataset", "build_dataset", "collate", "label_lut", "load_coco",
    "mmseg_dataset_config", "palette", "read_image", "register_detectron2", "render_samples", "LAYOUT", "SHAPES",
    "Scene", "class_names", "generate_scene", "make_dataset", "IGNORE_INDEX", "SampleTransform", "bbox_params",
    "build_transforms",
]
