"""Checks of command-line options that need neither torch nor open_clip.

Importing torch and open_clip takes 3-9 s; a typo in `--device` or `--model` should not cost
that before its one-line error. Everything here reads strings and the file system only.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

from skincache import derm_models
from skincache.defaults import TINY_MODEL
from skincache.errors import UsageError

DEVICES = "cpu, cuda, cuda:N, mps or auto"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_OWN_CONFIGS = Path(__file__).parent / "model_configs"


def check_device(device: str | None) -> None:
    """UsageError for anything but cpu, cuda, cuda:N, mps or auto (availability is checked
    later, where torch is loaded anyway)."""
    if device is not None and not _DEVICE_RE.match(device):
        raise UsageError(f"--device {device!r}: use {DEVICES}")


def check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise UsageError(f"{option} {value!r}: use one of {', '.join(choices)}")


def check_file(option: str, path: Path | str | None) -> None:
    """A file the user names must exist before anything heavy starts."""
    if path is not None and not Path(path).is_file():
        what = "a folder, not a file" if Path(path).is_dir() else "no such file"
        raise UsageError(f"{option} {path}: {what}")


def architectures() -> list[str]:
    """open_clip's architecture names plus skincache's shipped configs, read from the config
    files (the names `open_clip.list_models()` gives, without importing open_clip)."""
    names = {p.stem for p in _OWN_CONFIGS.glob("*.json")}
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        names |= {p.stem for p in (Path(folder) / "model_configs").glob("*.json")}
    return sorted(names, key=str.lower)


def check_model(name: str) -> None:
    """UsageError for a model name open_clip does not know, naming the closest ones."""
    if name.startswith("hf-hub:"):
        if name.count("/") != 1 or not name.split(":", 1)[1].strip("/"):
            raise UsageError(f"--model {name!r}: an hf-hub id is hf-hub:org/repo")
        return
    if derm_models.by_name(name):
        return
    known = architectures()
    if not known or name in known:  # open_clip not found: let the import say so
        return
    short = derm_models.short_names()
    by_lower = {c.lower(): c for c in [*known, *short]}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3,
                                                            cutoff=0.6)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UsageError(f"unknown model {name!r}{hint}: `skincache models` lists the "
                     f"architectures and their pretrained tags; derm short names: "
                     f"{', '.join(short)} (`skincache models --derm`); '{TINY_MODEL}' runs "
                     "offline, or give an hf-hub:org/repo id")


def check_templates(template_set: str) -> None:
    """`--templates`: one of the shipped prompt sets, or 'all'."""
    from skincache.prompts import ALL_TEMPLATES, TEMPLATE_SETS

    check_choice("--templates", template_set, (ALL_TEMPLATES, *sorted(TEMPLATE_SETS)))


_resume_hint = ""


def set_interrupt_hint(text: str) -> None:
    """What to say if Ctrl-C stops the command now (e.g. finetune names its run folder once
    it exists)."""
    global _resume_hint
    _resume_hint = text


def interrupt_hint() -> str:
    """How to go on after Ctrl-C. Each command that can resume sets its own hint: encode and
    demo (the rerun resumes from the last committed chunk), finetune (`--resume RUN`),
    bench-heads (the command with its --out-dir), fit-head (nothing resumes). The default is
    for the rest (info, audit, evaluate, predict...), which keep nothing half-done."""
    return _resume_hint or "run the same command again (it starts from the beginning)"
