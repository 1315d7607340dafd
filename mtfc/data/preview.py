"""A PNG grid of dataset samples with their labels drawn on (boxes, instance masks, semantic mask)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .base import TaskDataset, palette


def render_samples(dataset: TaskDataset, path: str | Path, *, num: int = 8, cols: int = 4) -> Path:
    """Draw the first ``num`` items of ``dataset`` into a PNG at ``path`` and return it.

    Each item gets the image with instance masks, boxes and class names overlaid (title: image-level
    label), and next to it the semantic mask in the dataset palette, when the dataset has them."""
    num = min(num, len(dataset))
    with_seg = "sem_seg" in dataset.target_keys
    per_item = 2 if with_seg else 1
    rows = -(-num // cols)
    figure = Figure(figsize=(2.2 * cols * per_item, 2.4 * rows), dpi=100)
    FigureCanvasAgg(figure)
    colours = np.array(palette(dataset.num_classes), np.float32) / 255.0
    for i in range(num):
        image, target = dataset[i]
        overlay = image.permute(1, 2, 0).numpy().copy()
        axes = figure.add_subplot(rows, cols * per_item, i * per_item + 1)
        for mask, cls in zip(target.get("masks", []), target.get("classes", [])):
            region = mask.numpy().astype(bool)
            overlay[region] = 0.55 * overlay[region] + 0.45 * colours[int(cls) + 1]
        axes.imshow(overlay, interpolation="nearest")
        for box, cls in zip(target.get("boxes", []), target.get("classes", [])):
            x0, y0, x1, y1 = box.tolist()
            axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, linewidth=1.2,
                                     edgecolor=colours[int(cls) + 1]))
            axes.text(x0 - 0.5, y0 - 1, dataset.class_names[int(cls)], fontsize=6, color="white",
                      bbox={"facecolor": colours[int(cls) + 1], "pad": 0.5, "linewidth": 0})
        title = dataset.class_names[target["label"]] if "label" in target else f"id {target['image_id']}"
        axes.set_title(title, fontsize=8)
        axes.axis("off")
        if with_seg:
            seg = target["sem_seg"].numpy()
            coloured = np.where((seg == 255)[..., None], 1.0, colours[np.minimum(seg, len(colours) - 1)])
            seg_axes = figure.add_subplot(rows, cols * per_item, i * per_item + 2)
            seg_axes.imshow(coloured, interpolation="nearest")
            seg_axes.set_title("sem_seg", fontsize=8)
            seg_axes.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
