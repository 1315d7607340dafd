"""Classification evaluation reproduces torchvision's reference protocol (resize the shorter side to 256,
crop the centre 224): a pretrained classifier gives through mtfc's evaluation split exactly the logits
it gives through torchvision's ``ImageFolder`` with its weights' ``ImageClassification`` preset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms._presets import ImageClassification

from mtfc.data import DatasetError, build_dataset, collate
from mtfc.pipeline import load_config
from mtfc.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher, normalize, pretrained_weights

#: val images (W, H): landscape and portrait 4:3, square, very narrow, smaller than the resize (upsampled),
#: one greyscale; train has one image per class.
VAL = {"n01440764": {"land.JPEG": (500, 375), "square.JPEG": (300, 300)},
       "n01443537": {"port.JPEG": (375, 500), "narrow.JPEG": (97, 411)},
       "n01484850": {"small.JPEG": (180, 120), "grey.JPEG": (333, 250)}}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """An ImageNet layout of JPEGs of the :data:`VAL` sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for class_name, files in VAL.items():
        for split, names in (("val", files), ("train", {"t.JPEG": (64, 48)})):
            for name, (width, height) in names.items():
                path = root / split / class_name / name
                path.parent.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                (image.convert("L") if name.startswith("grey") else image).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A ResNet-18 with random weights saved as a plain state_dict: the pretrained weights' stand-in."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18_stand_in.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def mtfc_batch(cfg: dict) -> tuple[torch.Tensor, list[int]]:
    images, targets = collate(list(build_dataset(cfg, "val")))
    return images, [t["label"] for t in targets]


def test_eval_split_gives_torchvision_reference_logits_exactly(imagenet, stand_in):
    reference = torchvision.datasets.ImageFolder(str(imagenet / "val"),
                                                 transform=ImageClassification(crop_size=224, resize_size=256))
    expected_inputs = torch.stack([reference[i][0] for i in range(len(reference))])
    assert reference.transform.mean == list(IMAGENET_MEAN) and reference.transform.std == list(IMAGENET_STD)

    images, labels = mtfc_batch({"type": "imagenet", "root": str(imagenet)})
    assert images.shape == (6, 3, 224, 224) and labels == [label for _, label in reference.samples]
    assert torch.equal(normalize(images), expected_inputs)

    teacher = build_teacher("resnet18", weights=stand_in).eval()
    torchvision_teacher = torchvision.models.resnet18()
    torchvision_teacher.load_state_dict(torch.load(stand_in, weights_only=True))
    with torch.no_grad():
        logits = teacher(normalize(images))
        expected = torchvision_teacher.eval()(expected_inputs)
    assert torch.equal(logits, expected)
    assert torch.equal(logits.argmax(1), expected.argmax(1))

    # imagefolder letterboxes unless asked; asked, it is the same protocol (256 is imagenet's default)
    letterboxed, _ = mtfc_batch({"type": "imagefolder", "root": str(imagenet)})
    assert not torch.equal(letterboxed, images) and (letterboxed[0, :, 168:] == 0).all()  # 500x375: padded rows
    asked, _ = mtfc_batch({"type": "imagefolder", "root": str(imagenet), "eval_resize": 256})
    assert torch.equal(asked, images)


def test_other_sizes_scale_the_resize_and_train_keeps_random_resized_crop(imagenet):
    at_64 = ImageClassification(crop_size=64, resize_size=73)   # round(64 * 256 / 224) = 73
    reference = torchvision.datasets.ImageFolder(str(imagenet / "val"), transform=at_64)
    images, _ = mtfc_batch({"type": "imagenet", "root": str(imagenet), "image_size": 64})
    assert torch.equal(normalize(images), torch.stack([reference[i][0] for i in range(len(reference))]))
    tall, _ = mtfc_batch({"type": "imagenet", "root": str(imagenet), "image_size": [64, 48]})
    assert tall.shape == (6, 3, 64, 48)

    cfg = {"root": str(imagenet), "augment": {"seed": 3}}
    train = build_dataset({**cfg, "type": "imagenet"}, "train", train=True)
    letterbox_train = build_dataset({**cfg, "type": "imagefolder"}, "train", train=True)
    image, expected = train[0][0], letterbox_train[0][0]   # the same seeded RandomResizedCrop
    assert train.transform.eval_resize is None and image.shape == (3, 224, 224) and torch.equal(image, expected)


def test_real_yaml_evaluates_as_its_weights_were_scored():
    cfg = load_config("configs/real.yaml")
    preset = pretrained_weights(cfg.teacher.arch, cfg.teacher.weights).transforms()
    assert (cfg.data.eval_resize, cfg.data.image_size) == (preset.resize_size[0], preset.crop_size[0]) == (232, 224)


@pytest.mark.parametrize("value", [200, "256", True, 256.0])
def test_a_bad_eval_resize_is_an_error_naming_the_key(imagenet, value):
    with pytest.raises(DatasetError, match=rf"^data block \(imagefolder\): eval_resize must be an integer of at "
                                           rf"least 224 \(the largest side of image_size\), got {value!r}$"):
        build_dataset({"type": "imagefolder", "root": str(imagenet), "eval_resize": value}, "val")
    with pytest.raises(DatasetError, match=r"^unknown key 'eval_resize' in the bundled data block: it belongs to "
                                           r"type imagefolder/imagenet$"):
        build_dataset({"type": "bundled", "root": str(imagenet), "eval_resize": 256}, "val")
