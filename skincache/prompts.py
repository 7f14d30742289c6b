"""Class prompt templates: which texts describe each class to the text tower.

Three sets, stored side by side in the cache so a head can pick one (or compare them) without
re-encoding: plain CLIP templates, dermoscopy templates, and clinical-context sentences.
"""

from __future__ import annotations

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
