"""Class prompt templates: which texts describe each class to the text tower.

Three sets, stored side by side in the cache so a head can pick one (or compare them) without
re-encoding: plain CLIP templates, dermoscopy templates, and clinical-context sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from skincache.data.classes import display_name

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "clip": (
        "a photo of {}.",
        "a close-up photo of {}.",
        "a cropped photo of {}.",
        "a good photo of {}.",
        "a photo of a {}.",
    ),
    "dermoscopy": (
        "a dermoscopic image of {}.",
        "a dermatoscopy image of {}.",
        "a dermoscopy photo of a skin lesion: {}.",
        "a dermoscopic image of a skin lesion showing {}.",
        "dermoscopy of {}.",
    ),
    "context": (
        "The lesion shows signs of {}.",
        "This skin lesion is diagnosed as {}.",
        "A skin lesion consistent with {}.",
        "Histopathology confirmed {} in this lesion.",
        "A dermatologist would classify this lesion as {}.",
    ),
}


def class_prompts(classes: list[str], template_set: str) -> list[list[str]]:
    """Prompts per class ([C][T]) for one template set, using the classes' full names."""
    if template_set not in TEMPLATE_SETS:
        raise KeyError(f"unknown template set '{template_set}'; known: {sorted(TEMPLATE_SETS)}")
    return [[t.format(display_name(c)) for t in TEMPLATE_SETS[template_set]] for c in classes]


#: The name that means every template set, side by side.
ALL_TEMPLATES = "all"


def side_by_side(template_set: str, features: Callable[[str], np.ndarray],
                 available: Iterable[str] | None = None) -> np.ndarray:
    """[C, T, D] prompt embeddings for `template_set`: `features(s)` ([C, T_s, D]) of each
    set it names, in `template_set_order`, side by side along the template axis. The cache's
    text (`runs.text_features`) and freshly encoded prompts (fine-tuning) are put together
    here, so a zero-shot head sees the same columns either way."""
    parts = [features(s) for s in template_set_order(template_set, available)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def template_set_order(template_set: str, available=None) -> list[str]:
    """The template sets that `template_set` names, in the one order every consumer uses:
    "all" is every available set (default: every known one) sorted by name, side by side;
    anything else is that one set. The zero-shot head on a cache (`fit-head --templates all`)
    and the fine-tune's zero-shot start agree because both read the sets in this order."""
    if template_set == ALL_TEMPLATES:
        return sorted(TEMPLATE_SETS if available is None else available)
    return [template_set]
