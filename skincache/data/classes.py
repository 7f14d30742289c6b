"""The class vocabulary: HAM10000 / ISIC 2018 diagnosis codes and their full names."""

from __future__ import annotations

HAM10000_CLASSES: list[str] = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]

DX_NAMES: dict[str, str] = {
    "akiec": "actinic keratoses and intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}

# HAM10000 class frequencies (10,015 images), used by the synthetic demo generator.
HAM10000_COUNTS: dict[str, int] = {
    "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142,
}

# ISIC 2018 Task 3 ground-truth column -> dx code.
ISIC_COLUMNS: dict[str, str] = {
    "MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df",
    "VASC": "vasc",
}


def display_name(label: str) -> str:
    """The words used for a class in prompts and reports: the full name for a known dx code,
    else the label with separators turned into spaces."""
    return DX_NAMES.get(label.lower(), label.replace("_", " ").replace("-", " "))
