"""The loaders on tiny datasets in every real layout, with the quirks of real data
(:mod:`mtfc.data.testing` writes them; the expected values below are worked out by hand from it)."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtfc.data import (
    DATASETS,
    CorruptFileError,
    DatasetError,
    DatasetWarning,
    Record,
    RecordList,
    build_dataset,
    grouped_loader,
    read_image,
)
from mtfc.codec import Codec
from mtfc.data.coco import PARSED
from mtfc.data.imagefolder import scan_image_folder
from mtfc.data.testing import write_real_layouts

WNIDS = ["n01440764", "n01443537", "n01484850"]
COCO_NAMES = ("person", "car", "train", "toothbrush")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    return write_real_layouts(tmp_path_factory.mktemp("real"))


@pytest.fixture
def no_dataset_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        yield


def _pixel(image: torch.Tensor, row: int, col: int) -> list[int]:
    return (image[:, row, col] * 255).round().int().tolist()


# ------------------------------------------------------------------------------------- ImageFolder
def test_image_modes_load_as_rgb(layouts):
    train = layouts["imagenet"] / "train"
    grey = read_image(train / "n01440764/b.JPEG")
    assert grey.shape == (24, 32, 3) and grey.dtype == np.uint8 and (grey == 100).all()
    cmyk = read_image(train / "n01443537/c.JPEG")
    assert cmyk.shape == (24, 32, 3) and (cmyk == [255, 0, 0]).all()
    rgba = read_image(train / "n01484850/e.png")
    assert rgba.shape == (24, 32, 3) and (rgba == [10, 20, 30]).all()
    assert read_image(train / "n01443537/d.JPEG").shape == (24, 32, 3)   # a PNG named .JPEG
    truncated = train / "n01484850/f.JPEG"
    with pytest.raises(CorruptFileError, match=rf"^{re.escape(str(truncated))}: corrupt or truncated image "
                                               r"\(image file is truncated"):
        read_image(truncated)


def test_imagefolder_labels_and_the_truncated_jpeg(layouts, no_dataset_warnings):
    # imagefolder letterboxes (imagenet would centre-crop: tests/test_classification_protocol.py)
    train = build_dataset({"type": "imagefolder", "root": str(layouts["imagenet"]), "image_size": 32}, "train")
    assert train.class_names == tuple(WNIDS)
    assert [Path(r.image_path).name for r in train.records] == ["a.JPEG", "b.JPEG", "c.JPEG", "d.JPEG", "e.png",
                                                                "f.JPEG"]
    assert [r.label for r in train.records] == [0, 0, 1, 1, 2, 2]
    image, target = train[2]
    assert target["label"] == 1 and target["orig_size"] == (24, 32)
    assert _pixel(image, 0, 0) == [255, 0, 0] and _pixel(image, 30, 0) == [0, 0, 0]   # CMYK red, then padding
    assert _pixel(train[1][0], 5, 5) == [100, 100, 100] and _pixel(train[4][0], 5, 5) == [10, 20, 30]
    with pytest.raises(CorruptFileError, match=r"n01484850/f\.JPEG: corrupt or truncated image"):
        train[5]


def test_on_corrupt_skip_returns_the_next_image_and_counts(layouts):
    cfg = {"type": "imagenet", "root": str(layouts["imagenet"]), "image_size": 32, "on_corrupt": "skip"}
    train = build_dataset(cfg, "train")
    with pytest.warns(DatasetWarning, match=r"f\.JPEG: corrupt or truncated image .*; skipped \(1 corrupt "
                                            r"file\(s\) skipped so far in this process\)$"):
        image, target = train[5]
    assert Path(target["file_name"]).name == "a.JPEG" and target["label"] == 0 and train.corrupt == {5}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        assert Path(train[5][1]["file_name"]).name == "a.JPEG"   # known bad: no second warning
    assert torch.equal(train[5][0], train[0][0])
    with pytest.raises(DatasetError, match=r"on_corrupt must be one of \['error', 'skip'\], got 'ignore'"):
        build_dataset({**cfg, "on_corrupt": "ignore"}, "train")


def test_val_takes_the_train_class_list(layouts, tmp_path, no_dataset_warnings):
    val = build_dataset({"type": "imagenet", "root": str(layouts["imagenet"]), "image_size": 32}, "val")
    assert val.class_names == tuple(WNIDS)            # val has no n01443537 folder
    assert [r.label for r in val.records] == [0, 2]   # its own folders would give [0, 1]

    copy = Path(shutil.copytree(layouts["imagenet"], tmp_path / "imagenet"))
    stray = copy / "val/n09999999"
    stray.mkdir()
    shutil.copy(copy / "val/n01440764/v1.JPEG", stray / "x.JPEG")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(stray))}: class folder 'n09999999' is not one of "
                                           rf"the 3 classes of the train split {re.escape(str(copy / 'train'))} "
                                           r"\(unknown folders: \['n09999999'\]\)$"):
        build_dataset({"type": "imagenet", "root": str(copy)}, "val")

    shutil.rmtree(copy / "train")   # without a train split, val's own folders are the classes
    alone = build_dataset({"type": "imagefolder", "root": str(copy)}, "val")
    assert alone.class_names == ("n01440764", "n01484850", "n09999999")
    assert [r.label for r in alone.records] == [0, 1, 2]


def test_folder_scans_are_cached_until_a_folder_changes(layouts, tmp_path):
    copy = Path(shutil.copytree(layouts["imagenet"] / "val", tmp_path / "val"))
    first = scan_image_folder(copy, WNIDS)
    assert scan_image_folder(copy, WNIDS) is first and len(first) == 2
    shutil.copy(copy / "n01440764/v1.JPEG", copy / "n01440764/v3.JPEG")
    os.utime(copy / "n01440764", ns=(0, 1))   # a new mtime even within the file system's clock tick
    again = scan_image_folder(copy, WNIDS)
    assert again is not first and [Path(p).name for p, _ in again] == ["v1.JPEG", "v3.JPEG", "v2.JPEG"]


# -------------------------------------------------------------------------------------------- COCO
def test_coco_train_skips_degenerate_annotations_with_a_count(layouts):
    ann_file = layouts["coco"] / "annotations/instances_train2017.json"
    with pytest.warns(DatasetWarning) as caught:
        train = build_dataset({"type": "coco", "root": str(layouts["coco"]), "image_size": 48}, "train")
    assert [str(w.message) for w in caught] == [
        f"{ann_file}: skipped 2 degenerate annotation(s) (1 with a box of zero or negative width or height, "
        "1 without a valid polygon); dropped 1 polygon(s) of fewer than 3 points from multi-polygon objects; "
        "strict: true makes them errors"]
    assert train.class_names == COCO_NAMES and train.coco.category_ids == [1, 3, 7, 90]
    assert train.target_keys == {"boxes", "classes", "masks", "image_id", "file_name", "image_size", "content_size",
                                 "orig_size"}
    items = [train[i][1] for i in range(len(train))]
    assert [t["image_id"] for t in items] == [1, 2, 3]
    assert [t["classes"].tolist() for t in items] == [[0, 3], [], [2, 3]]      # crowd (car, id 12) left out
    assert items[0]["boxes"].tolist() == [[4, 4, 28, 12], [30, 16, 40, 28]]
    assert items[0]["masks"].sum((1, 2)).tolist() == [128, 120]                 # two 8x8 squares; 10x12
    assert items[1]["boxes"].shape == (0, 4) and items[1]["masks"].shape == (0, 32, 48)   # aspect kept (COCO's default)
    assert items[2]["boxes"].tolist() == [[40, 20, 48, 32], [10, 20, 20, 30]]   # clipped to the 48x32 image
    assert items[2]["masks"].sum((1, 2)).tolist() == [96, 100]
    assert _pixel(train[1][0], 0, 0) == [100, 100, 100]                           # greyscale JPEG


def test_coco_strict_mode_names_the_first_degenerate_annotation(layouts):
    ann_file = layouts["coco"] / "annotations/instances_train2017.json"
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(ann_file))}: annotation id 13: bbox \[5, 5, 0, 10\] "
                                           r"has non-positive width or height \(strict: true; without it such "
                                           r"annotations are skipped with a warning\)$"):
        build_dataset({"type": "coco", "root": str(layouts["coco"]), "strict": True}, "train")
    with pytest.raises(DatasetError, match=r"strict must be true or false, got 'yes'"):
        build_dataset({"type": "coco", "root": str(layouts["coco"]), "strict": "yes"}, "train")


def test_coco_val_is_clean_and_consistent_with_train(layouts, no_dataset_warnings):
    val = build_dataset({"type": "coco", "root": str(layouts["coco"]), "image_size": 48}, "val")
    (_, first), (image, second) = val[0], val[1]
    assert first["classes"].tolist() == [1, 3] and first["boxes"].tolist() == [[8, 8, 24, 24], [30, 4, 44, 12]]
    assert first["masks"].sum((1, 2)).tolist() == [256, 112]
    assert second["image_id"] == 102 and second["orig_size"] == (30, 40) and second["classes"].tolist() == []
    assert image.shape == (3, 36, 48)   # 40x30 (WxH) fits 48 wide, its aspect kept: COCO's default resize


def test_coco_keep_aspect_pads_only_to_the_codecs_divisibility(layouts, no_dataset_warnings):
    cfg = {"type": "coco", "root": str(layouts["coco"]), "image_size": 48, "resize": "keep_aspect"}
    val = build_dataset(cfg, "val", size_divisibility=8)
    (first_image, first), (image, second) = val[0], val[1]
    # 48x32 (WxH) fills 48 wide, a multiple of 8 already; 40x30 -> 48x36, padded to 48x40 (the next multiple of 8)
    assert first_image.shape == (3, 32, 48) and first["content_size"] == (32, 48) and first["image_size"] == (32, 48)
    assert image.shape == (3, 40, 48) and second["content_size"] == (36, 48) and second["image_size"] == (40, 48)
    assert second["orig_size"] == (30, 40) and image[:, 36:].abs().sum() == 0 and image[:, 35].abs().sum() > 0
    assert first["boxes"].tolist() == [[8, 8, 24, 24], [30, 4, 44, 12]]   # scale 1: the file's own coordinates
    letterbox = build_dataset({**cfg, "resize": "letterbox"}, "val", size_divisibility=8)[1]
    assert letterbox[0].shape == (3, 48, 48) and letterbox[1]["content_size"] == (48, 48)
    assert torch.equal(letterbox[0][:, :40], image)          # the same resize; only the padding differs
    assert build_dataset({k: v for k, v in cfg.items() if k != "resize"}, "val", size_divisibility=8)[1][0].shape == (3, 40, 48)
    assert build_dataset({"type": "imagefolder", "root": str(layouts["imagenet"]), "image_size": 32},
                         "val")[0][0].shape == (3, 32, 32)   # the default per type: COCO keeps the aspect, folders letterbox


def test_grouped_loader_batches_by_size_and_keeps_every_image_once(layouts):
    cfg = {"type": "coco", "root": str(layouts["coco"]), "image_size": 48, "resize": "keep_aspect"}
    val = build_dataset(cfg, "val", size_divisibility=8)
    twice = torch.utils.data.ConcatDataset([val, val, val])   # sizes 32x48, 40x48, 32x48, 40x48, 32x48, 40x48
    batches = [(tuple(images.shape), [t["image_id"] for t in targets]) for images, targets in grouped_loader(twice, 2)]
    assert batches == [((2, 3, 32, 48), [101, 101]), ((2, 3, 40, 48), [102, 102]), ((1, 3, 32, 48), [101]),
                       ((1, 3, 40, 48), [102])]


def test_resize_is_checked_with_a_suggestion(layouts):
    with pytest.raises(DatasetError, match=r"^data block \(coco\): unknown resize 'keep-aspect': did you mean "
                                           r"'keep_aspect'\?$"):
        build_dataset({"type": "coco", "root": str(layouts["coco"]), "resize": "keep-aspect"}, "val")


def test_coco_val_with_other_categories_is_an_error(layouts, tmp_path):
    copy = Path(shutil.copytree(layouts["coco"], tmp_path / "coco"))
    val_file = copy / "annotations/instances_val2017.json"
    data = json.loads(val_file.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] != 90]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 90]
    val_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(val_file))}: categories differ from those of "
                                           rf"{re.escape(str(copy / 'annotations/instances_train2017.json'))} "
                                           r"\(\(id, name\) in one only: \[\(90, 'toothbrush'\)\]\); class indices "
                                           r"would not match$"):
        build_dataset({"type": "coco", "root": str(copy)}, "val")


def test_each_coco_file_is_parsed_once_until_it_changes(layouts, tmp_path):
    copy = Path(shutil.copytree(layouts["coco"], tmp_path / "coco"))
    cfg = {"type": "coco", "root": str(copy), "image_size": 48}
    with pytest.warns(DatasetWarning):
        train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    with pytest.warns(DatasetWarning):
        assert build_dataset(cfg, "train").coco is train.coco
    assert build_dataset(cfg, "val").coco is val.coco
    val_file = copy / "annotations/instances_val2017.json"
    data = json.loads(val_file.read_text())
    data["annotations"] = data["annotations"][:1]
    val_file.write_text(json.dumps(data))
    edited = build_dataset(cfg, "val")
    assert edited.coco is not val.coco and edited[0][1]["classes"].tolist() == [1]
    PARSED.clear()
    assert build_dataset(cfg, "val").coco is not edited.coco


# ------------------------------------------------------------------------------------ segmentation
def test_ade20k_other_is_ignore(layouts, no_dataset_warnings):
    for split, n in (("train", 2), ("val", 1)):
        ade = build_dataset({"type": "ade20k", "root": str(layouts["ade20k"]), "image_size": 24}, split)
        assert len(ade) == n and len(ade.class_names) == 150 and ade.class_names[0] == "wall"
        sem = ade[0][1]["sem_seg"]   # evaluation keeps the file's 24x16 (WxH) label map
        assert sem.shape == (16, 24) and [int(sem[0, 0]), int(sem[3, 3]), int(sem[10, 15])] == [255, 1, 150]


def test_voc_borders_are_ignore(layouts, no_dataset_warnings):
    voc = build_dataset({"type": "voc", "root": str(layouts["voc"]), "image_size": 24}, "val")
    assert [Path(r.image_path).name for r in voc.records] == ["2007_000033.jpg"]
    assert voc.class_names[14] == "person" and len(voc.class_names) == 20
    sem = voc[0][1]["sem_seg"]
    assert [int(sem[0, 0]), int(sem[3, 5]), int(sem[4, 6]), int(sem[11, 17]), int(sem[12, 18])] == [0, 255, 15, 15,
                                                                                                    255]


def test_cityscapes_train_ids_shift_by_one(layouts, no_dataset_warnings):
    city = build_dataset({"type": "cityscapes", "root": str(layouts["cityscapes"]), "image_size": 24}, "train")
    assert [Path(r.image_path).parent.name for r in city.records] == ["aachen"]
    assert city.class_names[0] == "road" and city.class_names[18] == "bicycle"
    sem = city[0][1]["sem_seg"]
    assert [int(sem[0, 0]), int(sem[3, 3]), int(sem[12, 0])] == [255, 19, 1]


# -------------------------------------------------------------------------------- catalog, records
def test_the_catalog_and_its_key_checks(layouts, tmp_path):
    assert sorted(DATASETS) == ["ade20k", "bundled", "cityscapes", "coco", "imagefolder", "imagenet", "voc"]
    coco = {"type": "coco", "root": str(layouts["coco"])}
    with pytest.raises(DatasetError, match=r"^unknown key 'ann_fille' in the coco data block: did you mean "
                                           r"'ann_file'\?$"):
        build_dataset({**coco, "ann_fille": "x.json"}, "val")
    with pytest.raises(DatasetError, match=r"^unknown key 'dir' in the coco data block: it belongs to type "
                                           r"imagefolder/imagenet$"):
        build_dataset({**coco, "dir": "{split}"}, "val")

    @DATASETS.register("test_listing", keys=("listing",), image_size=16)
    def build_listing(cfg, split, **options):
        from mtfc.data import TaskDataset

        names = cfg["listing"][split]
        records = [Record(image_path=cfg["root"] / name, image_id=i, source="listing", label=0)
                   for i, name in enumerate(names)]
        return TaskDataset(records, class_names=["thing"], image_size=options["image_size"],
                           on_corrupt=options["on_corrupt"])

    try:
        with pytest.raises(KeyError, match="'test_listing' is already registered"):
            DATASETS.register("test_listing")(build_listing)
        dataset = build_dataset({"type": "test_listing", "root": str(layouts["imagenet"] / "val/n01440764"),
                                 "listing": {"val": ["v1.JPEG"]}}, "val")
        image, target = dataset[0]
        assert image.shape == (3, 16, 16) and target["label"] == 0
    finally:
        DATASETS.pop("test_listing")


def test_record_list_round_trips(tmp_path):
    records = [Record(image_path=tmp_path / f"{i}.jpg", image_id=i, source="s", label=i % 3,
                      instances=[{"bbox": [0, 0, i + 1, 1], "class": 0, "segmentation": None}] * i)
               for i in range(5)]
    packed = RecordList(records)
    assert len(packed) == 5 and list(packed) == records and packed[-1] == records[4]
    assert list(pickle.loads(pickle.dumps(packed))) == records
    with pytest.raises(IndexError, match=r"record 5 out of range \(5 records\)"):
        packed[5]


def test_layouts_without_the_corrupt_file(tmp_path):
    roots = write_real_layouts(tmp_path, corrupt=False)
    assert sorted(roots) == ["ade20k", "cityscapes", "coco", "imagenet", "voc"]
    train = build_dataset({"type": "imagenet", "root": str(roots["imagenet"])}, "train")
    assert len(train) == 5 and [t["label"] for _, t in train] == [0, 0, 1, 1, 2]


def test_the_data_blocks_of_real_yaml_build_on_the_tiny_layouts(layouts):
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/real.yaml").read_text())
    blocks = [cfg["data"]] + [head["data"] for head in cfg["heads"].values() if "data" in head]
    assert [block["type"] for block in blocks] == ["imagenet", "coco", "ade20k"]
    sizes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)   # COCO train's degenerate annotations
        for block in blocks:
            for split in ("train", "val"):
                dataset = build_dataset({**block, "root": str(layouts[block["type"]])}, split, train=split == "train",
                                        size_divisibility=Codec.size_divisibility_of(cfg["bottleneck"]["codec"]))
                sizes.append((len(dataset), dataset.num_classes, tuple(dataset[0][0].shape)))
    # evaluation keeps the aspect: 48x32 and 24x16 (WxH) files fit 512 wide, 341 high, padded to 344 (4 | 344)
    assert sizes == [(6, 3, (3, 224, 224)), (2, 3, (3, 224, 224)), (3, 4, (3, 512, 512)), (2, 4, (3, 344, 512)),
                     (2, 150, (3, 512, 512)), (1, 150, (3, 344, 512))]
