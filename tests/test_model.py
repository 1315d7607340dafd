"""Head contract, MultiTaskModel and the classification head."""
from pathlib import Path

import pytest
import torch

import mtfc
from mtfc.data import build_dataset
from mtfc.head import HEADS, Head
from mtfc.model import MultiTaskModel, load_head
from mtfc.optim import OptimSpec
from mtfc.train import fit_head, train_head

from conftest import tiny_codec

BUILTIN = {"classification": {}, "detection": {"image_size": 32}, "segmentation": {}}


def _build(name: str, latent_channels: int | None, num_classes: int = 3) -> Head:
    """A tiny built-in head for the 3-class test dataset (segmentation adds background)."""
    num_classes += name == "segmentation"
    return HEADS.build(name, latent_channels=latent_channels, num_classes=num_classes, arch="resnet18",
                       hidden_channels=16, **BUILTIN[name])


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_head_honours_the_contract(name, shapes_root, frozen_codec):
    codec = frozen_codec
    head = _build(name, codec.latent_channels)
    assert isinstance(head, Head) and head.task and head.metric and head.required_targets
    val = build_dataset({"type": "bundled", "root": str(shapes_root)}, "val")
    images, targets = mtfc.data.collate([val[i] for i in range(2)])
    assert all(k in targets[0] for k in head.required_targets)
    latent = codec.quantize(images)
    losses = head.train()(latent, targets)
    assert losses and all(v.dim() == 0 and v.requires_grad for v in losses.values())
    with torch.no_grad():
        preds = head.eval()(latent, targets)
    assert len(preds) == 2
    ev = head.build_evaluator(val)
    ev.reset()
    ev.process(targets, preds)
    assert head.metric in ev.evaluate()


def test_one_decode_feeds_every_head(images, monkeypatch):
    codec = tiny_codec()
    model = MultiTaskModel(codec)
    model.attach("a", _build("classification", codec.latent_channels))
    model.attach("b", _build("classification", codec.latent_channels))
    model.eval()
    calls = []
    decode = codec.decode_with_headers
    monkeypatch.setattr(codec, "decode_with_headers", lambda s: calls.append(len(s)) or decode(s))
    streams = codec.encode(images)
    out = model(streams)
    assert calls == [3] and set(out) == {"a", "b"}
    from_images = model(images)
    for name in out:
        assert all(torch.equal(p, q) for p, q in zip(out[name], from_images[name]))


def test_attach_detach_errors(frozen_codec):
    codec = frozen_codec
    model = MultiTaskModel(codec)
    head = model.attach("cls", _build("classification", codec.latent_channels))
    with pytest.raises(KeyError, match="already attached"):
        model.attach("cls", head)
    with pytest.raises(TypeError, match="not an mtfc.Head"):
        model.attach("x", torch.nn.Linear(2, 2))
    assert model.detach("cls") is head
    with pytest.raises(KeyError, match="no head named"):
        model.detach("cls")
    with pytest.raises(ValueError, match="frozen codec"):
        MultiTaskModel(mtfc.Codec(latent_channels=8, hidden_channels=16))
    with pytest.raises(KeyError, match="unknown head"):
        HEADS.build("no-such-head")


def test_head_checkpoint_records_the_codec(tmp_path, images, frozen_codec):
    a, b = frozen_codec, tiny_codec(seed=1)
    model = MultiTaskModel(a)
    model.attach("cls", _build("classification", a.latent_channels)).eval()
    path = model.save_head("cls", tmp_path / "cls.pt")
    assert torch.load(path, weights_only=True)["codec_fingerprint"] == a.fingerprint
    with pytest.raises(mtfc.CheckpointError, match=f"{path} was trained on codec {a.fingerprint}, not on "
                                                   f"{b.fingerprint}; retrain the head"):
        MultiTaskModel(b).load_head("cls", path)
    again = MultiTaskModel(a)
    again.load_head("cls", path).eval()
    assert torch.equal(torch.stack(again(images)["cls"]), torch.stack(model(images)["cls"]))
    with pytest.raises(mtfc.CheckpointError, match="not on uncompressed pixels"):
        load_head(path, None)
    with pytest.raises(mtfc.CheckpointError, match=f"head checkpoint {tmp_path / 'missing.pt'} does not exist; "
                                                   "`mtfc train-head CONFIG`"):
        load_head(tmp_path / "missing.pt", a.fingerprint)


def test_training_a_head_leaves_the_codec_bit_identical(tmp_path, shapes_root, frozen_codec):
    codec = tiny_codec()
    train = build_dataset({"type": "bundled", "root": str(shapes_root)}, "train", train=True)
    image = train[0][0][None]
    before_state = {k: v.clone() for k, v in codec.state_dict().items()}
    before_bytes = codec.encode(image)
    model = MultiTaskModel(codec)
    model.attach("cls", _build("classification", codec.latent_channels))
    train_head(model, "cls", train, out_dir=tmp_path / "h", epochs=1, batch_size=32, progress=False)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.pt", "log.jsonl", "tb"]  # no last.pt
    saved = torch.load(tmp_path / "h" / "head.pt", weights_only=True)["state_dict"]
    assert saved.keys() == model.heads["cls"].state_dict().keys()  # the head's own weights only
    after = codec.state_dict()
    assert before_state.keys() == after.keys() and all(torch.equal(before_state[k], after[k]) for k in after)
    assert codec.encode(image) == before_bytes and codec.fingerprint == frozen_codec.fingerprint


def test_classification_fine_tune_learns_from_the_latent(tmp_path, shapes_root, frozen_codec):
    """A short fine-tune on the frozen codec's latent fits its images well above chance: the latent
    carries the class through the entropy bottleneck, and head + engine learn from it. (Generalisation
    needs a trained teacher and codec: the demo measures it.)"""
    torch.manual_seed(0)
    codec = frozen_codec
    images = torch.utils.data.Subset(build_dataset({"type": "bundled", "root": str(shapes_root)}, "train"), range(32))
    head = HEADS.build("classification", latent_channels=codec.latent_channels, num_classes=3, hidden_channels=16)
    history = fit_head(head, images, codec=codec, val_set=images, val_every=100, out_dir=tmp_path / "cls",
                       epochs=15, batch_size=32, optim=OptimSpec(lr=3e-3, schedule="constant"), progress=False)
    losses = [e["train"]["loss"] for e in history["epochs"]]
    assert losses[-1] < 0.1 * losses[0]
    assert history["val"]["top1"] > 100 / 3 + 25, history["val"]


def test_a_checkpoint_never_chooses_what_gets_imported(tmp_path, monkeypatch, frozen_codec, capsys):
    """A head checkpoint names its type and the module that defined it; mtfc imports that module only
    when the operator asks (``imports:``, ``--import``, entry points), and says which flag to pass."""
    import sys

    from mtfc.checkpoint import HEAD, load_checkpoint, save_checkpoint
    from mtfc.cli import main
    from mtfc.codec import save_codec
    from mtfc.model import save_head

    (tmp_path / "evilmod.py").write_text("from pathlib import Path\nPath(__file__).with_name('ran').touch()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    codec = save_codec(frozen_codec, tmp_path / "codec.pt")
    path = save_head(_build("classification", frozen_codec.latent_channels), tmp_path / "head.pt", frozen_codec.fingerprint)
    ckpt = load_checkpoint(path, HEAD)
    ckpt["spec"].update(type="evil", module="evilmod")
    save_checkpoint(path, HEAD, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    message = (f"{path}: head type 'evil' is not registered; it was defined in module 'evilmod', which mtfc imports "
               "only when you ask: pass `--import evilmod` (mtfc serve, mtfc loadtest), list it under `imports:` in "
               "the config, or declare it as an `mtfc.heads` entry point")
    with pytest.raises(mtfc.CheckpointError) as e:
        load_head(path, frozen_codec.fingerprint)
    assert e.value.args[0] == message
    assert main(["serve", str(codec), "--head", f"evil={path}"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"mtfc serve: error: {message}"
    assert not (tmp_path / "ran").exists() and "evilmod" not in sys.modules
    ckpt["spec"]["type"] = "classification.evilmod"  # a dotted type is no module path either
    save_checkpoint(path, HEAD, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(mtfc.CheckpointError, match="head type 'classification.evilmod' is not registered"):
        load_head(path, frozen_codec.fingerprint)


def _three_heads(codec) -> MultiTaskModel:
    model = MultiTaskModel(codec)
    torch.manual_seed(0)
    for name in BUILTIN:
        model.attach(name, _build(name, codec.latent_channels))
    return model.eval()


def test_model_evaluation_and_server_give_identical_predictions(shapes_root, frozen_codec):
    """One decode-and-run-every-head: ``model(streams)``, the evaluation's mtfc method and the server's
    batcher all go through ``MultiTaskModel.run_heads`` with the streams' geometry records."""
    from mtfc.deploy.server import Batcher, Metrics
    from mtfc.deploy.wire import prediction_to_json
    from mtfc.pipeline import mtfc_method

    model = _three_heads(frozen_codec)
    val = build_dataset({"type": "bundled", "root": str(shapes_root)}, "val")
    images, targets = mtfc.data.collate([val[i] for i in range(3)])
    streams = frozen_codec.encode(images)
    latent, records = model.decode(streams)
    assert records == [{"image_size": (32, 32), "content_size": (32, 32), "original_size": (32, 32)}] * 3
    direct = {name: [prediction_to_json(model.heads[name].task, p) for p in preds]
              for name, preds in model(streams).items()}
    evaluated = mtfc_method(model)(images, targets)
    assert evaluated.num_bytes == [len(s) for s in streams]
    assert {name: [prediction_to_json(model.heads[name].task, p) for p in preds]
            for name, preds in evaluated.predictions.items()} == direct
    batcher = Batcher(model, max_batch=8, max_batch_pixels=1 << 20, max_wait_ms=1, metrics=Metrics())
    try:
        served = batcher._predict(tuple(BUILTIN), list(zip(latent.split(1), records)))
    finally:
        batcher.close()
    assert served == [{name: direct[name][i] for name in BUILTIN} for i in range(3)]


def test_run_heads_needs_one_record_per_image(frozen_codec):
    model = _three_heads(frozen_codec)
    latent = torch.zeros(2, frozen_codec.latent_channels, 8, 8)
    with pytest.raises(ValueError, match="got 1 geometry records for a batch of 2 latents"):
        model.run_heads(latent, [mtfc.head.geometry((32, 32))])
    with pytest.raises(ValueError, match="the segmentation head needs one geometry record per image .* got none "
                                         "for a batch of 2"):
        model.heads["segmentation"].predict(latent)
    with pytest.raises(ValueError, match=r"content size \(40, 32\) does not fit the 32x32 input"):
        model.heads["detection"].predict(latent, [mtfc.head.geometry((40, 32))] * 2)
    with pytest.raises(ValueError, match=r"^image \?: content size \(40, 32\) does not fit the 32x32 input$"):
        model.heads["segmentation"].predict(latent, [mtfc.head.geometry((40, 32))] * 2)
    with pytest.raises(ValueError, match=r"^bad geometry: content 40x32 must be positive and fit the 32x32 input, "
                                         r"original 40x32 positive$"):
        mtfc.head.geometry((32, 32), content_size=(40, 32))


def test_every_head_predicts_in_original_coordinates_from_its_record(frozen_codec):
    """Two non-square contents on one 64x64 canvas, the second resized from a 48x128 original: each head
    sees its record's content only and answers in its original's coordinates (Detectron2's
    ``detector_postprocess``, MMSeg's crop-and-resize of the logits)."""
    from mmseg.models.utils import resize

    model = _three_heads(frozen_codec)
    torch.manual_seed(1)
    latent = frozen_codec.quantize(torch.rand(2, 3, 64, 64))
    records = [mtfc.head.geometry((64, 64), content_size=(64, 40)),
               mtfc.head.geometry((64, 64), original_size=(48, 128), content_size=(24, 64))]
    unresized = [records[0], mtfc.head.geometry((64, 64), content_size=(24, 64))]
    preds, same = model.run_heads(latent, records), model.run_heads(latent, unresized)
    seg = model.heads["segmentation"]
    assert [tuple(m.shape) for m in preds["segmentation"]] == [(64, 40), (48, 128)]
    logits = seg.decode_head.predict(seg.backbone(latent), [{"img_shape": (64, 64)}] * 2, None)
    assert torch.equal(preds["segmentation"][0], logits[0].argmax(0)[:64, :40])
    assert torch.equal(preds["segmentation"][1], resize(logits[1:, :, :24, :64], size=(48, 128), mode="bilinear",
                                                        align_corners=False)[0].argmax(0))
    assert torch.equal(same["segmentation"][1], logits[1].argmax(0)[:24, :64])
    kept, scaled = same["detection"][1]["instances"], preds["detection"][1]["instances"]
    assert kept.image_size == (24, 64) and scaled.image_size == (48, 128) and len(kept) == len(scaled) > 0
    assert torch.equal(scaled.pred_boxes.tensor, kept.pred_boxes.tensor * 2)   # 24x64 -> 48x128: exactly x2
    assert torch.equal(scaled.scores, kept.scores) and torch.equal(scaled.pred_classes, kept.pred_classes)
    first = preds["detection"][0]["instances"]
    assert first.image_size == (64, 40) and float(first.pred_boxes.tensor[:, 0::2].max()) <= 40
    assert len(preds["classification"]) == 2
