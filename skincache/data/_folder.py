"""Class folders: `root/<class>/**/*.jpg`, or `root/<split>/<class>/...`."""

from __future__ import annotations

import os
from pathlib import Path

from ._files import IMAGE_EXTS, SPLIT_ALIASES, normalize_split, slug
from ._record import DataError, Dataset, Record
from ._registry import Confidence, Probe, expected_text, register_source


def _images_below(folder: Path) -> list[str]:
    """Absolute paths (str) of the image files below `folder`, in sorted walk order."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_layout(root: Path) -> bool:
    """True for `root/<split>/<class>/...` (every sub-folder is named like a split)."""
    subs = _subdirs(root)
    return bool(subs) and all(p.name.lower() in SPLIT_ALIASES for p in subs)


def _has_class_folders(root: Path) -> bool:
    """At least one class sub-folder (or `<split>/<class>` folder) holds an image."""
    bases = _subdirs(root) if _split_layout(root) else [root]
    for base in bases:
        for class_dir in _subdirs(base):
            for _dirpath, _dirnames, filenames in os.walk(class_dir):
                if any(os.path.splitext(f)[1].lower() in IMAGE_EXTS for f in filenames):
                    return True
    return False


def _detect(probe: Probe) -> Confidence:
    """Any folder of folders of images fits: the weakest claim, the last tried."""
    return Confidence.LIKELY if probe.is_dir and _has_class_folders(probe.path) \
        else Confidence.NO


@register_source(
    "folder", layout="a folder with one sub-folder of images per class", detect=_detect,
    priority=50, split="split folders, else assigned", group="none",
)
def load_folder(root: Path) -> Dataset:
    """Images in one sub-folder per class: `root/<class>/**/*.{jpg,png,...}`.

    Also `root/<split>/<class>/...` when every sub-folder is a split name (train, val, test...).
    image_id = the path relative to `root` without extension; classes = sorted class folders.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    split_dirs = [(normalize_split(d.name), d) for d in _subdirs(root)] if _split_layout(root) \
        else [(None, root)]
    records = []
    for split, base in split_dirs:
        for class_dir in _subdirs(base):
            for path in _images_below(class_dir):
                rel = os.path.splitext(os.path.relpath(path, root))[0]
                records.append(Record(
                    image_id=Path(rel).as_posix(),
                    source=path,
                    label=class_dir.name,
                    split=split,
                ))
    if not records:
        raise DataError(f"{root}: no images in class sub-folders; {expected_text()}")
    return Dataset(name=slug(root.name), records=records,
                   classes=sorted({r.label for r in records}), root=str(root),
                   kind="folder")
