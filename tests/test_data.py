"""mtfc.data: the bundled dataset generator, the standard-format loaders, transforms and errors."""
from __future__ import annotations

import colorsys
import json
import re
import shutil
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mtfc.data import (
    ClassificationDataset,
    CocoDetectionDataset,
    DatasetError,
    DatasetWarning,
    MultiTaskDataset,
    SHAPES,
    SampleTransform,
    bbox_params,
    build_dataset,
    collate,
    generate_scene,
    load_coco,
    make_dataset,
    mmseg_dataset_config,
    register_detectron2,
    render_samples,
)

SPLITS = {"train": 12, "val": 8}
CONFIG = {"image_size": 64, "num_classes": 3, "splits": SPLITS, "max_objects": 3, "seed": 0}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("bundled") / "shapes", **CONFIG)


@pytest.fixture
def copy(root, tmp_path) -> Path:
    """A private copy of the bundled dataset to break."""
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# ------------------------------------------------------------------------------------- generator
def test_generation_is_deterministic_and_independent_of_workers(root, tmp_path):
    again = make_dataset(tmp_path / "again", workers=2, **CONFIG)
    assert _files(again) == _files(root)
    other = make_dataset(tmp_path / "other", **{**CONFIG, "seed": 1})
    changed = [k for k, v in _files(other).items() if k.endswith(".png") and _files(root).get(k) != v]
    assert changed, "another seed must give other images"


@pytest.mark.parametrize("size", [16, 48])
def test_scenes_keep_their_invariants(size):
    for seed in range(30):
        scene = generate_scene(np.random.default_rng(seed), size, num_classes=len(SHAPES), max_objects=4)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.classes) == len(scene.masks) <= 4
        areas = scene.masks.sum(axis=(1, 2))
        assert (areas > 0).all() and scene.masks.sum(0).max() == 1
        expected = np.zeros((size, size), np.uint8)
        for cls, mask in zip(scene.classes, scene.masks):
            expected[mask] = cls + 1
        np.testing.assert_array_equal(scene.sem_seg, expected)
        assert scene.label == scene.classes[int(np.argmax(areas))]


def _object_hues(scene) -> list[tuple[int, float]]:
    """(class, hue of the median colour inside the object) for each object of a scene."""
    hues = []
    for cls, mask in zip(scene.classes, scene.masks):
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        r, g, b = np.median(scene.image[inner if inner.any() else mask], axis=0) / 255.0
        hues.append((cls, colorsys.rgb_to_hsv(r, g, b)[0]))
    return hues


def test_independent_hues_change_the_colours_only_and_leave_the_class_to_the_shape():
    def in_own_band(cls: int, hue: float, k: int = 5) -> bool:   # class k's band is (k + ½ ± ¼)/K (+ measuring slack)
        return abs((hue * k - cls - 0.5 + k / 2) % k - k / 2) <= 0.3

    inside = {}
    for mode in ("class", "independent"):
        scenes = [generate_scene(np.random.default_rng(seed), 64, 5, 2, hue=mode) for seed in range(40)]
        hues = [h for scene in scenes for h in _object_hues(scene)]
        inside[mode] = (sum(in_own_band(cls, hue) for cls, hue in hues), len(hues))
    assert inside == {"class": (58, 58), "independent": (8, 58)}   # ~10 % of the hue circle is a class's band
    a, b = (generate_scene(np.random.default_rng(3), 64, 5, 2, hue=mode) for mode in ("class", "independent"))
    assert a.classes == b.classes and a.label == b.label and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.sem_seg, b.sem_seg) and not np.array_equal(a.image, b.image)
    with pytest.raises(ValueError, match="hue must be one of class, independent, got 'random'"):
        make_dataset(Path("unused"), hue="random")


def test_generated_with_tells_whether_a_dataset_is_the_one_a_config_asks_for(root, tmp_path):
    from mtfc.data.synthetic import generated_with

    assert generated_with(root, {**CONFIG, "workers": 2}) and generated_with(root, {**CONFIG, "hue": "class"})
    assert "hue" not in json.loads((root / "dataset.json").read_text())["config"]   # left out at its default
    assert not generated_with(root, {**CONFIG, "hue": "independent"}) and not generated_with(root, {**CONFIG, "seed": 1})
    assert not generated_with(tmp_path, CONFIG)
    other = make_dataset(tmp_path / "independent", **{**CONFIG, "hue": "independent"})
    assert generated_with(other, {**CONFIG, "hue": "independent"}) and not generated_with(other, CONFIG)


def test_refuses_to_overwrite_unless_asked(root, copy, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        make_dataset(copy, **CONFIG)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no dataset.json"):
        make_dataset(tmp_path / "precious", overwrite=True, **CONFIG)
    assert _files(make_dataset(copy, overwrite=True, **CONFIG)) == _files(root)


def test_formats_are_standard_and_consistent(root):
    from pycocotools.coco import COCO
    from torchvision.datasets import ImageFolder

    info = json.loads((root / "dataset.json").read_text())
    names = info["class_names"]
    assert info["config"] == CONFIG and info["mtfc_version"] and (root / "README.md").is_file()
    assert names == sorted(names) and len(names) == CONFIG["num_classes"]
    folder = ImageFolder(str(root / "classification/val"), allow_empty=True)
    assert folder.classes == names and len(folder) == SPLITS["val"]

    coco = COCO(str(root / "annotations/instances_val.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3] and len(coco.getImgIds()) == SPLITS["val"]
    labels = {}
    for image in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert anns, "every image has at least one object"
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        assert masks.sum(0).max() == 1, "visible instance masks do not overlap"
        for ann, mask in zip(anns, masks):
            x, y, w, h = ann["bbox"]
            assert ann["area"] == mask.sum() > 0 and ann["iscrowd"] == 0
            assert [x, y, x + w, y + h] == _tight_box(mask)
        sem = np.array(Image.open(root / "segmentation/val" / image["file_name"]))
        assert sem.dtype == np.uint8 and sem.shape == (image["height"], image["width"])
        expected = np.zeros_like(sem)
        for ann, mask in zip(anns, masks):
            expected[mask] = ann["category_id"]
        np.testing.assert_array_equal(sem, expected)
        dominant = anns[int(np.argmax([a["area"] for a in anns]))]["category_id"] - 1
        assert image["file_name"].split("/")[0] == names[dominant]
        labels[Path(image["file_name"]).name] = dominant
    assert {Path(path).name: label for path, label in folder.samples} == labels


def test_mmseg_reads_the_label_maps(root):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    cfg = mmseg_dataset_config(root, "val")
    mm = DATASETS.build(cfg)
    assert len(mm) == SPLITS["val"] and mm.metainfo["classes"][0] == "background"
    ours = {Path(t["file_name"]).name: t["sem_seg"] for _, t in MultiTaskDataset(root, "val")}
    for i in range(len(mm)):
        info = mm.get_data_info(i)
        packed = mm[i]
        gt = packed["data_samples"].gt_sem_seg.data[0].numpy()
        np.testing.assert_array_equal(gt, ours[Path(info["img_path"]).name].numpy())
        assert Path(info["seg_map_path"]).relative_to(root / "segmentation/val")


# --------------------------------------------------------------------------------------- loaders
def test_multitask_dataset_gives_every_target(root):
    dataset = build_dataset({"type": "bundled", "root": str(root)}, "val")
    coco = load_coco(root / "annotations/instances_val.json")
    assert dataset.target_keys >= {"label", "boxes", "classes", "masks", "sem_seg", "image_id", "file_name",
                                   "image_size"}
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    for target, image_info in zip(targets, coco.images):
        anns = coco.annotations[image_info["id"]]
        assert target["image_id"] == image_info["id"] and target["image_size"] == (64, 64)
        assert target["boxes"].dtype == torch.float32 and target["classes"].dtype == torch.int64
        assert target["masks"].dtype == torch.uint8 and target["sem_seg"].dtype == torch.int64
        assert target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["classes"].tolist() == [a["category_id"] - 1 for a in anns]
        assert target["masks"].sum((1, 2)).tolist() == [a["area"] for a in anns]
        assert target["label"] == int(target["classes"][target["masks"].sum((1, 2)).argmax()])
        assert Path(target["file_name"]).is_file()


def test_classification_loader_matches_bundled_labels(root):
    bundled = {Path(t["file_name"]).name: t["label"] for _, t in MultiTaskDataset(root, "val")}
    folder = build_dataset({"type": "imagefolder", "root": str(root / "classification"), "image_size": 64}, "val")
    assert folder.target_keys == {"label", "image_id", "file_name", "image_size", "content_size", "orig_size"}
    assert {Path(t["file_name"]).name: t["label"] for _, t in folder} == bundled


def test_resize_and_pad_keep_targets_aligned(root):
    dataset = MultiTaskDataset(root, "val", image_size=(48, 96))
    image, target = dataset[0]
    assert image.shape == (3, 48, 96) and target["image_size"] == (48, 96) and target["orig_size"] == (64, 64)
    assert (image[:, :, 48:] == 0).all() and target["content_size"] == (48, 96)   # a letterbox's padding is picture
    label_map = np.array(Image.open(Path(root) / mmseg_dataset_config(root, "val")["data_prefix"]["seg_map_path"]
                                    / Path(target["file_name"]).relative_to(Path(root) / "classification" / "val")
                                    .with_suffix(".png")))
    assert torch.equal(target["sem_seg"], torch.as_tensor(label_map, dtype=torch.long))   # eval: the file's map
    assert not target["masks"][:, :, 48:].any()
    for box, mask in zip(target["boxes"], target["masks"]):
        assert box.tolist() == _tight_box(mask.numpy())
        assert box[2] <= 48


def test_train_augmentation_keeps_boxes_masks_and_semantics_consistent(root):
    plain = MultiTaskDataset(root, "train")
    dataset = MultiTaskDataset(root, "train", train=True, augment={"seed": 0, "scale": (0.3, 0.8)})
    changed = 0
    for i in range(24):
        image, target = dataset[i % len(dataset)]
        masks, sem = target["masks"].bool(), target["sem_seg"]
        assert image.shape == (3, 64, 64)
        assert len(target["boxes"]) == len(masks) == len(target["classes"])
        for box, mask, cls in zip(target["boxes"], masks, target["classes"]):
            assert mask.any() and box.tolist() == _tight_box(mask.numpy())
            assert (sem[mask] == cls + 1).all()
        covered = masks.any(0) if len(masks) else torch.zeros_like(sem, dtype=torch.bool)
        assert torch.equal(covered, (sem > 0) & (sem != 255))
        changed += not torch.equal(image, plain[i % len(dataset)][0])
    assert changed >= 20, "the train pipeline must actually augment"


def test_dataloader_workers_draw_different_augmentations(root):
    dataset = MultiTaskDataset(root, "train", train=True, augment={"seed": 0})
    twice = torch.utils.data.Subset(dataset, [0, 0])  # one item per worker, both from the same state
    loader = torch.utils.data.DataLoader(twice, batch_size=1, num_workers=2, collate_fn=collate)
    first, second = (images for images, _ in loader)
    assert not torch.equal(first, second)


def test_augmented_image_and_mask_stay_aligned():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:50] = 1
    mask[40:60, 5:15] = 1
    image = np.repeat(mask[..., None] * 255, 3, axis=2)
    transform = SampleTransform(64, train=True, color_jitter=0.0, seed=3)
    for _ in range(20):
        tensor, target = transform({"image": image, "boxes": [_tight_box(mask)], "classes": [0],
                                    "masks": mask[None], "sem_seg": mask})
        sem = (target["sem_seg"] == 1).numpy().astype(np.uint8)
        # Bilinear image vs nearest-neighbour masks may disagree only on the one-pixel boundary band.
        band = cv2.dilate(sem, np.ones((3, 3), np.uint8)) != cv2.erode(sem, np.ones((3, 3), np.uint8))
        mismatch = (tensor[0] > 0.5).numpy() != sem.astype(bool)
        assert not (mismatch & ~band).any() and sem.any()
        assert torch.equal(target["masks"][0], target["sem_seg"].to(torch.uint8))


def test_vanished_instances_are_dropped_with_their_masks():
    transform = SampleTransform(16, train=False)
    transform.compose = A.Compose([A.Crop(0, 0, 16, 16)], bbox_params=bbox_params())
    masks = np.zeros((3, 64, 64), np.uint8)
    masks[0, 2:10, 3:12] = 1                 # inside the crop: kept
    masks[1, 40:60, 40:60] = 1               # outside: box and mask vanish
    masks[2, 20:30, 10:14] = 1               # its (declared) box reaches into the crop, its pixels do not
    boxes = [_tight_box(m) for m in masks[:2]] + [[10.0, 0.0, 14.0, 30.0]]
    _, target = transform({"image": np.zeros((64, 64, 3), np.uint8), "boxes": boxes, "classes": [0, 1, 2],
                           "masks": masks, "sem_seg": masks.max(0)})
    assert target["classes"].tolist() == [0]
    assert target["boxes"].tolist() == [[3.0, 2.0, 12.0, 10.0]] and target["masks"].shape == (1, 16, 16)
    _, boxes_only = transform({"image": np.zeros((64, 64, 3), np.uint8), "boxes": boxes, "classes": [0, 1, 2]})
    assert boxes_only["classes"].tolist() == [0, 2] and "masks" not in boxes_only


# ------------------------------------------------------------------------------------ detectron2
def test_detectron2_registration_and_coco_evaluator_on_ground_truth(root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    dataset = MultiTaskDataset(root, "val")
    name = register_detectron2("mtfc_test_bundled_val", dataset.ann_file, dataset.image_root)
    assert register_detectron2(name, dataset.ann_file, dataset.image_root) == name
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == len(dataset) and Path(dicts[0]["file_name"]).is_file()
    assert MetadataCatalog.get(name).thing_classes == list(dataset.class_names)

    def evaluate(shift: int) -> dict:
        evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=None,
                                  use_fast_impl=False)
        evaluator.reset()
        for _, target in dataset:
            n = len(target["boxes"])
            instances = Instances(target["image_size"], pred_boxes=Boxes(target["boxes"] + shift),
                                  scores=torch.ones(n), pred_classes=target["classes"],
                                  pred_masks=target["masks"].bool())
            evaluator.process([{"image_id": target["image_id"]}], [{"instances": instances}])
        return evaluator.evaluate()

    perfect = evaluate(0)
    assert perfect["bbox"]["AP"] == pytest.approx(100.0) and perfect["segm"]["AP"] == pytest.approx(100.0)
    assert evaluate(6)["bbox"]["AP"] < 90.0


# --------------------------------------------------------------------------------- real formats
def _write_image(path: Path, array: np.ndarray, palette: bool = False) -> None:
    """Write ``array`` in the format of ``path``'s suffix; ``palette``: a P-mode PNG as VOC's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.frombytes("P", array.shape[::-1], array.tobytes())
        image.putpalette([v for k in range(256) for v in (k, 255 - k, k // 2)])
    else:
        image = Image.fromarray(array)
    image.save(path)


def test_coco_config_maps_category_ids_and_polygons(tmp_path):
    _write_image(tmp_path / "val2017/a.png", np.full((40, 80, 3), 128, np.uint8))
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": 80, "height": 40}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 10, 20, 10], "area": 200, "iscrowd": 0,
                 "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
                {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 80, 40], "area": 3200, "iscrowd": 1,
                 "segmentation": {"size": [40, 80], "counts": [0, 3200]}}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/instances_val2017.json").write_text(json.dumps(coco))
    dataset = build_dataset({"type": "coco", "root": str(tmp_path), "image_size": 40}, "val")
    assert dataset.class_names == ("car", "dog") and dataset.coco.category_ids == [3, 18]
    image, target = dataset[0]
    # COCO photographs keep their aspect by default: 80x40 (WxH) -> 40x20, no padding beyond the divisibility (1)
    assert image.shape == (3, 20, 40) and target["orig_size"] == (40, 80) and target["image_id"] == 7
    assert target["classes"].tolist() == [1], "crowd regions are not training targets"
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 10.0]]
    assert target["masks"].shape == (1, 20, 40) and target["masks"].sum() > 0


def test_segmentation_configs_use_mmseg_listings(tmp_path):
    pixels = np.full((8, 8, 3), 90, np.uint8)
    raw = np.array([[0, 1, 150, 255]] * 2 + [[0] * 4] * 6, np.uint8)
    raw = np.pad(raw, ((0, 0), (0, 4)))
    _write_image(tmp_path / "ade/images/validation/x.jpg", pixels)
    _write_image(tmp_path / "ade/annotations/validation/x.png", raw)
    ade = build_dataset({"type": "ade20k", "root": str(tmp_path / "ade"), "image_size": 8}, "val")
    assert len(ade.class_names) == 150
    assert ade[0][1]["sem_seg"][0, :4].tolist() == [255, 1, 150, 255]

    city = tmp_path / "city"
    _write_image(city / "leftImg8bit/val/bonn/b_000_leftImg8bit.png", pixels)
    _write_image(city / "gtFine/val/bonn/b_000_gtFine_labelTrainIds.png", np.where(raw == 150, 18, raw))
    cityscapes = build_dataset({"type": "cityscapes", "root": str(city), "image_size": 8}, "val")
    assert cityscapes[0][1]["sem_seg"][0, :4].tolist() == [1, 2, 19, 255]

    voc = tmp_path / "voc"
    _write_image(voc / "JPEGImages/v.jpg", pixels)
    _write_image(voc / "SegmentationClass/v.png", np.where(raw == 150, 20, raw), palette=True)
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("v\n")
    pascal = build_dataset({"type": "voc", "root": str(voc), "image_size": 8}, "val")
    assert pascal.class_names[0] == "aeroplane" and len(pascal.class_names) == 20
    assert pascal[0][1]["sem_seg"][0, :4].tolist() == [0, 1, 20, 255]

    _write_image(voc / "SegmentationClass/v.png", np.where(raw == 150, 21, raw), palette=True)
    with pytest.raises(DatasetError, match=r"v\.png: unknown class ids \[21\]"):
        pascal[0]


def test_imagenet_config_reads_an_image_folder(tmp_path):
    _write_image(tmp_path / "val/n01/a.png", np.zeros((30, 20, 3), np.uint8))
    _write_image(tmp_path / "val/n02/b.png", np.zeros((10, 10, 3), np.uint8))
    dataset = build_dataset({"type": "imagenet", "root": str(tmp_path), "image_size": 16}, "val")
    images, targets = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 16, 16) and [t["label"] for t in targets] == [0, 1]


# -------------------------------------------------------------------------------------- bad input
def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("annotations"), "missing or non-list top-level key 'annotations'"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] is missing \['bbox'\]"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be 4 finite numbers"),
    (lambda d: d["annotations"][0].update(category_id=99), "unknown category id 99"),
    (lambda d: d["annotations"][0].update(image_id=12345), "unknown image id 12345"),
    (lambda d: d["annotations"][0]["segmentation"].update(size=[32, 32]), r"mask size \[32, 32\].*does not match"),
    (lambda d: d.update(images=[], annotations=[]), r"no images \(empty split\)"),
])
def test_malformed_coco_json_is_named(copy, edit, message):
    ann_file = copy / "annotations/instances_val.json"
    _edit_json(ann_file, edit)
    with pytest.raises(DatasetError, match=message) as err:
        MultiTaskDataset(copy, "val")
    assert str(ann_file) in str(err.value)


@pytest.mark.parametrize("bbox, message, reason", [
    ([1, 2, -3, 4], "non-positive width or height", "with a box of zero or negative width or height"),
    ([500, 2, 3, 4], "lies outside image", "with a box outside its image"),
])
def test_degenerate_boxes_are_skipped_or_strict_errors(copy, bbox, message, reason):
    ann_file = copy / "annotations/instances_val.json"
    annotations = json.loads(ann_file.read_text())["annotations"]
    first = annotations[0]
    same_image = [a["id"] for a in annotations if a["image_id"] == first["image_id"]]
    _edit_json(ann_file, lambda d: d["annotations"][0].update(bbox=bbox))
    with pytest.raises(DatasetError, match=rf"annotation id {first['id']}: bbox .* {message}") as err:
        MultiTaskDataset(copy, "val", strict=True)
    assert str(ann_file) in str(err.value)
    with pytest.warns(DatasetWarning, match=rf"instances_val.json: skipped 1 degenerate annotation\(s\) "
                                            rf"\(1 {reason}\); strict: true makes them errors$"):
        dataset = MultiTaskDataset(copy, "val")
    assert [a["id"] for a in dataset.coco.annotations[first["image_id"]]] == same_image[1:]


def test_bad_files_are_named(copy):
    (copy / "annotations/instances_val.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val.json: not valid JSON"):
        CocoDetectionDataset(copy / "classification/val", copy / "annotations/instances_val.json", image_size=64)
    with pytest.raises(DatasetError, match="instances_train2017.json: COCO annotation file not found"):
        build_dataset({"type": "coco", "root": str(copy)}, "train")


def test_missing_image_and_size_mismatches_are_named(copy):
    dataset = MultiTaskDataset(copy, "val")
    image_path = Path(dataset.records[0].image_path)
    image_path.unlink()
    with pytest.raises(DatasetError, match=f"{re.escape(str(image_path))}: image file not found .*instances_val"):
        dataset[0]

    seg_path = dataset.records[1].seg_map_path
    cv2.imwrite(str(seg_path), np.zeros((32, 64), np.uint8))
    with pytest.raises(DatasetError, match=f"{re.escape(str(seg_path))}: label map is 64x32 .* but image"):
        dataset[1]
    cv2.imwrite(str(seg_path), np.full((64, 64), 9, np.uint8))
    with pytest.raises(DatasetError, match=rf"{re.escape(str(seg_path))}: unknown class ids \[9\]"):
        dataset[1]

    cv2.imwrite(str(dataset.records[2].image_path), np.zeros((64, 32, 3), np.uint8))
    with pytest.raises(DatasetError, match="image is 32x64 .* says 64x64"):
        dataset[2]


def test_unknown_classes_splits_and_types_are_named(copy, tmp_path):
    ann_file = copy / "annotations/instances_val.json"
    _edit_json(ann_file, lambda d: d["images"][0].update(file_name="hexagon/000000.png"))
    with pytest.raises(DatasetError, match="unknown class 'hexagon'"):
        MultiTaskDataset(copy, "val")
    with pytest.raises(DatasetError, match=r"no split 'test' \(splits: \['train', 'val'\]\)"):
        MultiTaskDataset(copy, "test")
    with pytest.raises(DatasetError, match="dataset.json: not found"):
        MultiTaskDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match="needs 'type' and 'root'"):
        build_dataset({"root": str(copy)}, "val")
    with pytest.raises(DatasetError, match="unknown dataset type 'kitti'"):
        build_dataset({"type": "kitti", "root": str(copy)}, "val")
    (copy / "classification/val/hexagon").mkdir()
    with pytest.raises(DatasetError, match=r"classification/val/hexagon: class folder 'hexagon' is not one of the 3 "
                                           r"classes \(unknown folders: \['hexagon'\]\)"):
        ClassificationDataset(copy / "classification/val", image_size=64,
                              class_names=json.loads((copy / "dataset.json").read_text())["class_names"])
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(empty))}: no images \(empty split\)"):
        ClassificationDataset(empty, image_size=64)


# ---------------------------------------------------------------------------------- the command
def test_make_dataset_command_and_preview(tmp_path, capsys):
    from mtfc.cli import main

    out = tmp_path / "tool"
    assert main(["make-dataset", "--root", str(out), "--image-size", "32", "--classes", "2", "--train", "4", "--val", "4",
                      "--workers", "1", "--preview", str(tmp_path / "grid.png")]) == 0
    assert f"to {out} in " in capsys.readouterr().out
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"]["val"]["images"] == 4 and info["class_names"] == ["circle", "square"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 200 and grid.height > 100
    assert render_samples(MultiTaskDataset(out, "train"), tmp_path / "b.png", num=2).is_file()
    assert main(["make-dataset", "--root", str(tmp_path / "hues"), "--image-size", "32", "--classes", "2",
                 "--train", "4", "--val", "0", "--workers", "1", "--hue", "independent"]) == 0
    assert json.loads((tmp_path / "hues" / "dataset.json").read_text())["config"]["hue"] == "independent"


@pytest.mark.parametrize("divisibility", [4, 16])
def test_keep_aspect_is_the_letterbox_on_square_images(shapes_root, divisibility):
    """The bundled dataset (square originals at a multiple of the divisibility) gives bit-identical
    items either way: the demo and Fashion-MNIST do not change with ``resize``."""
    cfg = {"type": "bundled", "root": str(shapes_root)}
    letterbox = build_dataset(cfg, "val", size_divisibility=divisibility)
    keep = build_dataset({**cfg, "resize": "keep_aspect"}, "val", size_divisibility=divisibility)
    for i in range(len(letterbox)):
        (a, ta), (b, tb) = letterbox[i], keep[i]
        assert torch.equal(a, b) and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k] for k in ta)
        assert ta["content_size"] == ta["image_size"] == ta["orig_size"] == (32, 32)
