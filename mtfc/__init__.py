"""mtfc — multi-task feature compression for split computing.

One Entropic-Student encoder + learned entropy model is trained once and frozen; any number of task
heads (classification, Detectron2 detection, MMSeg segmentation, your own) run on the same
compressed latent. See README.md.
"""
from mtfc.bitstream import BitstreamError
from mtfc.checkpoint import CheckpointError
from mtfc.codec import Codec, load_codec, save_codec
from mtfc.head import HEADS, Distillation, Head, HeadContext
from mtfc.model import MultiTaskModel

__version__ = "0.1.0"
__all__ = ["BitstreamError", "CheckpointError", "Codec", "Distillation", "HEADS", "Head", "HeadContext",
           "MultiTaskModel", "load_codec", "save_codec", "train_head"]


def __getattr__(name: str):
    # Lazy: the training stack (engine, data) is not needed to decode streams on a server.
    if name == "train_head":
        from mtfc.train import train_head

        return train_head
    raise AttributeError(f"module 'mtfc' has no attribute {name!r}")
