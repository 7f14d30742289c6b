"""The registry of published dermatology encoders: short names (`dermlip-b16`, `monet`) for
the open_clip ids they load as, with each model's architecture, preprocessing, license and
what loading it needs.

The registry is data (`derm_models.json`), read into `DermModel`s, in the spirit of timm's
pretrained configs: one entry bundles where the weights come from and how images are
prepared. Torch-free, so the CLI can check a `--model` short name before torch loads.
`models.py` resolves the short names wherever a model is accepted, and asks `load_problem`
before loading, so a missing package, a missing token or an architecture stock open_clip lacks
is one line, not open_clip's traceback.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from skincache.errors import UsageError

_REGISTRY = Path(__file__).with_name("derm_models.json")


@dataclass(frozen=True)
class DermModel:
    """One published encoder: what `--model NAME` stands for and how it loads.

    `model` is what open_clip is given: an `hf-hub:org/repo` id or an architecture name, with
    `pretrained` its tag for the latter. `weights == "checkpoint"` means there is no
    downloadable open_clip copy and `--checkpoint FILE` is required (`checkpoint_note` says
    where the file comes from). `needs` are Python packages the model's towers import;
    `fork` is set when stock open_clip cannot build the architecture (it says why); `token`
    when the Hub may ask for a login. `verified` / `unverified` say which facts were checked
    against the model's own card, config or code."""

    name: str
    title: str
    model: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    text_tower: str
    license: str
    paper: str
    pretrained: str | None = None
    weights: str = "hub"
    checkpoint_note: str = ""
    needs: tuple[str, ...] = ()
    fork: str = ""
    token: str = ""
    gated: bool = False
    verified: tuple[str, ...] = ()
    unverified: tuple[str, ...] = field(default=())

    @property
    def is_hub(self) -> bool:
        return self.model.startswith("hf-hub:")

    @property
    def repo_id(self) -> str:
        return self.model.removeprefix("hf-hub:")

    @property
    def source(self) -> str:
        """Where the weights come from, in words for the table."""
        if self.weights == "checkpoint":
            return f"{self.model} + --checkpoint FILE"
        return f"{self.model} / {self.pretrained}" if self.pretrained else self.model

    def missing_packages(self) -> list[str]:
        """The packages of `needs` this Python cannot import."""
        return [p for p in self.needs if importlib.util.find_spec(p) is None]


def _entry(d: dict) -> DermModel:
    tuples = {"mean", "std", "needs", "verified", "unverified"}
    return DermModel(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


@functools.cache
def registry() -> dict[str, DermModel]:
    """short name -> entry, in the file's order."""
    data = json.loads(_REGISTRY.read_text())
    out: dict[str, DermModel] = {}
    for d in data["models"]:
        e = _entry(d)
        if e.name in out:
            raise ValueError(f"{_REGISTRY}: short name {e.name!r} appears twice")
        out[e.name] = e
    return out


def short_names() -> list[str]:
    return list(registry())


def by_name(name: str) -> DermModel | None:
    """The entry a short name (any case) stands for, else None."""
    return registry().get(name.lower())


def by_model(model: str) -> DermModel | None:
    """The entry whose hf-hub id is `model` (so the checks run for users who give the id
    itself). Plain architectures (ViT-B-16) are shared by several entries: None."""
    if not model.startswith("hf-hub:"):
        return None
    for e in registry().values():
        if e.is_hub and e.model.lower() == model.lower():
            return e
    return None


def resolve(name: str) -> str:
    """What open_clip is given for `name`: a short name's model, anything else unchanged."""
    e = by_name(name)
    return e.model if e else name


def entry_for(name: str) -> DermModel | None:
    """The entry `name` refers to, as a short name or as its hf-hub id."""
    return by_name(name) or by_model(name)


def unknown_short_name(name: str) -> UsageError:
    """The one line for a name that is neither a short name nor anything open_clip knows."""
    return UsageError(f"unknown derm model {name!r}; the short names are: "
                      f"{', '.join(short_names())} (`skincache models --derm` lists them)")


def has_token() -> bool:
    """A Hugging Face token is set (HF_TOKEN) or saved by `huggingface-cli login`."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # an old huggingface_hub without get_token
        return False


def in_local_cache(entry: DermModel) -> bool:
    """The entry's open_clip config is already in the local Hugging Face cache."""
    if not entry.is_hub:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(entry.repo_id, "open_clip_config.json")
    except Exception:
        return False
    return isinstance(found, str)


def load_problem(entry: DermModel, checkpoint: str | None = None) -> str:
    """Why `entry` cannot load in this install, as one line; '' when nothing is known to
    stop it. Checked in order: an architecture stock open_clip lacks, missing packages, a
    required checkpoint, a gated repo without a token (unless already cached)."""
    if entry.fork:
        return (f"{entry.name} ({entry.model}) needs {entry.fork}; not built in skincache "
                "yet")
    missing = entry.missing_packages()
    if missing:
        return (f"{entry.name} ({entry.model}) needs the Python package(s) "
                f"{', '.join(missing)} for its towers ({entry.architecture}); "
                f"pip install {' '.join(missing)}")
    if entry.weights == "checkpoint" and not checkpoint:
        return f"{entry.name}: {entry.checkpoint_note}"
    if entry.gated and not has_token() and not in_local_cache(entry):
        return (f"{entry.name} ({entry.model}) is gated on the Hugging Face Hub: accept its "
                f"terms at https://huggingface.co/{entry.repo_id}, then set HF_TOKEN or run "
                "`huggingface-cli login`")
    return ""
