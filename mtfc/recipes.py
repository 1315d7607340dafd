"""Named training recipes of the field (``recipe:`` in a config): the values a recipe fixes, in one place.

A recipe lays its values over the config file's (nested sections merge; a head's values go to every head
of the recipe's head type); the config's other keys (data, βs, epochs, heads' architectures) stay. A
``--set`` on a key the recipe fixes is an error naming the recipe, never silently dropped.

``entropic-student`` is the Entropic Student as sc2bench configures it for ImageNet
(``configs/ilsvrc2012/supervised_compression/entropic_student/splitable_resnet50-fp-beta*_from_resnet50.yaml``;
Matsubara et al., WACV 2022): stage 1 trains the ``es`` encoder (``FPBasedResNetBottleneck``), its
entropy bottleneck and decoder with Adam at 1e-3 (every parameter, the prior's density included),
the learning rate ×0.1 at 50 % and 80 % of the steps (their epochs 5 and 8 of 10), on the summed squared
error at ``layer1..layer4`` plus β · the summed bits (``reduction: sum``); stage 2 fine-tunes the
classifier (decoder + ``layer2..4`` + fc, from the stage-1 student) with Hinton KD at temperature 1,
α = 0.5, SGD at 1e-3 with plain momentum 0.9 and weight decay 5e-4, ×0.1 at half the steps. Epochs
stay the config's (sc2bench's are sized for ImageNet). sc2bench's detection and segmentation students
fine-tune whole pretrained COCO/VOC models, which have no counterpart here: those heads keep the
config's recipe.
"""
from __future__ import annotations

import copy
from typing import Any

_ES_STAGE1_OPTIM = {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0, "schedule": "multistep",
                    "milestones": [0.5, 0.8], "gamma": 0.1, "warmup": 0.0, "final_lr": 0.01, "clip_grad": None,
                    "nesterov": True}
_ES_STAGE2_OPTIM = {"name": "sgd", "lr": 1.0e-3, "weight_decay": 5.0e-4, "schedule": "multistep",
                    "milestones": [0.5], "gamma": 0.1, "warmup": 0.0, "final_lr": 0.01, "clip_grad": None,
                    "nesterov": False}

#: recipe name → {"bottleneck": values, "heads": {head type: values}}
RECIPES: dict[str, dict[str, Any]] = {
    "entropic-student": {
        "bottleneck": {"codec": {"encoder": "es"}, "stages": ["layer1", "layer2", "layer3", "layer4"],
                       "select_taps": None, "saliency": 0.0, "reduction": "sum", "entropy_lr": None,
                       "aux_lr": 1.0e-3, "optim": _ES_STAGE1_OPTIM},
        "heads": {"classification": {"distill": True, "reference": "teacher",
                                     "kwargs": {"temperature": 1.0, "alpha": 0.5}, "optim": _ES_STAGE2_OPTIM}},
    },
}


def recipe_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """The values the config's ``recipe`` (if any) fixes, as a nested dict shaped like the config;
    an unknown recipe is a ``ValueError`` naming the known ones."""
    name = cfg.get("recipe")
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)} (or leave `recipe` out)")
    recipe = RECIPES[name]
    heads = {head: recipe["heads"][(spec or {}).get("type", head)] for head, spec in (cfg.get("heads") or {}).items()
             if (spec or {}).get("type", head) in recipe["heads"]}
    return copy.deepcopy({"bottleneck": recipe["bottleneck"], **({"heads": heads} if heads else {})})


def apply_recipe(cfg: dict[str, Any], overridden: list[str] = ()) -> dict[str, Any]:
    """``cfg`` with its recipe's values laid over it; ``overridden`` (dotted keys set on the command
    line) may not touch a key the recipe fixes."""
    values = recipe_values(cfg)
    fixed = _leaves(values)
    for key in overridden:
        clash = [k for k in fixed if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
        if clash:
            raise ValueError(f"--set {key}: recipe {cfg['recipe']!r} fixes {clash[0]}; drop the --set, or the "
                             "recipe and set its values yourself")
    return lay_over(copy.deepcopy(cfg), values)


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]
    return out


def lay_over(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` (changed in place) with ``values`` laid over it: nested mappings merge; anything else, an
    empty mapping included, replaces."""
    for k, v in values.items():
        if isinstance(v, dict) and v and isinstance(base.get(k), dict):
            lay_over(base[k], v)
        else:
            base[k] = v
    return base
