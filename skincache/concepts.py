"""Clinical concepts as text: which dermoscopic structures the cache is scored against, and how.

A concept list is data (`concept_lists/dermoscopy.json` ships with the package; `encode
--concepts FILE` takes a user's own): concepts, each with a few phrasings ("terms"), and prompt
templates, each paired with a reference prompt. Scoring follows MONET (Kim et al., Nature
Medicine 2024, and its released code): for template t, the image's cosine similarity to the
concept's prompts (the mean over its terms) is contrasted with its similarity to the template's
reference prompt ("This is dermoscopy image of {}" against "This is dermoscopy image") through a
two-way softmax at the model's temperature, and the presence score is the mean over templates.
The reference takes out what every dermoscopy caption shares, so the score says how much more
the image looks like "... of blue-whitish veil" than like any dermoscopy image.

numpy and the standard library only (layer 2): the cache stores the arrays, heads score with
`ConceptBank`, neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import read_json_file
from skincache.errors import InputFileError

FORMAT = "skincache.concepts"
FORMAT_VERSION = 1
#: the shipped list: the 7-point checklist, pattern analysis, a few clinical signs
SHIPPED = Path(__file__).parent / "concept_lists" / "dermoscopy.json"
MAX_CONCEPTS = 1000
MAX_TERMS = 50
MAX_TEXT = 200
_TOP_KEYS = {"format", "format_version", "name", "description", "prompts", "concepts"}
_PROMPT_KEYS = {"template", "reference"}
_CONCEPT_KEYS = {"name", "terms", "group"}


@dataclass(frozen=True)
class Concept:
    name: str
    terms: tuple[str, ...]
    group: str = ""


@dataclass(frozen=True)
class PromptPair:
    """A template with one `{}` for a concept's term, and the reference it is contrasted with."""

    template: str
    reference: str


@dataclass(frozen=True)
class ConceptList:
    """A validated concept list (`load_concepts`): what `encode` turns into `/concepts/`."""

    name: str
    concepts: tuple[Concept, ...]
    prompts: tuple[PromptPair, ...]
    description: str = ""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                "description": self.description,
                "prompts": [{"template": p.template, "reference": p.reference}
                            for p in self.prompts],
                "concepts": [{"name": c.name, "terms": list(c.terms), "group": c.group}
                             for c in self.concepts]}

    @property
    def sha256(self) -> str:
        """Of the content that changes the embeddings (part of the cache key)."""
        d = self.to_dict()
        d.pop("description")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def texts(self) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
        """(prompt texts, their concept index, their template index, reference texts): every
        template x term of every concept, concept-major."""
        prompts, concept, template = [], [], []
        for k, c in enumerate(self.concepts):
            for t, p in enumerate(self.prompts):
                for term in c.terms:
                    prompts.append(p.template.format(term))
                    concept.append(k)
                    template.append(t)
        return (prompts, np.array(concept, np.int32), np.array(template, np.int32),
                [p.reference for p in self.prompts])


def _problem(path: Path | str, problem: str) -> InputFileError:
    return InputFileError(f"concept list {path}: {problem}")


def _text(path, where: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _problem(path, f"{where} must be a non-empty string, got {v!r:.60}")
    if len(v) > MAX_TEXT:
        raise _problem(path, f"{where} is longer than {MAX_TEXT} characters")
    return v.strip()


def parse_concepts(data: Any, path: Path | str = "<dict>") -> ConceptList:
    """A concept list from its JSON value, every problem one `InputFileError` naming `path`
    and the field."""
    if not isinstance(data, dict):
        raise _problem(path, "not a JSON object")
    if data.get("format") != FORMAT:
        raise _problem(path, f"format must be {FORMAT!r}, got {data.get('format')!r}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _problem(path, f"unknown keys {unknown} (known: {sorted(_TOP_KEYS)})")
    if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise _problem(path, f"format_version {data.get('format_version')!r} is not "
                       f"{FORMAT_VERSION}")
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise _problem(path, "'prompts' must be a non-empty list of {template, reference}")
    pairs = []
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or set(p) != _PROMPT_KEYS:
            raise _problem(path, f"prompts[{i}] must be an object with exactly 'template' and "
                           "'reference'")
        template = _text(path, f"prompts[{i}].template", p["template"])
        reference = _text(path, f"prompts[{i}].reference", p["reference"])
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or \
                template.replace("{}", "").count("}"):
            raise _problem(path, f"prompts[{i}].template must hold exactly one '{{}}' (where "
                           f"the concept goes), got {template!r}")
        if "{" in reference or "}" in reference:
            raise _problem(path, f"prompts[{i}].reference must not hold braces")
        pairs.append(PromptPair(template, reference))
    concepts = data.get("concepts")
    if not isinstance(concepts, list) or not concepts:
        raise _problem(path, "'concepts' must be a non-empty list of {name, terms}")
    if len(concepts) > MAX_CONCEPTS:
        raise _problem(path, f"{len(concepts)} concepts; at most {MAX_CONCEPTS}")
    out, seen = [], set()
    for i, c in enumerate(concepts):
        if not isinstance(c, dict) or not {"name", "terms"} <= set(c) or set(c) - _CONCEPT_KEYS:
            raise _problem(path, f"concepts[{i}] must be an object with 'name', 'terms' and "
                           "optionally 'group'")
        name = _text(path, f"concepts[{i}].name", c["name"])
        if name in seen:
            raise _problem(path, f"concept {name!r} is listed twice")
        seen.add(name)
        terms = c["terms"]
        if not isinstance(terms, list) or not terms or len(terms) > MAX_TERMS:
            raise _problem(path, f"concepts[{i}] ({name}): 'terms' must be a list of 1-"
                           f"{MAX_TERMS} phrasings")
        group = _text(path, f"concepts[{i}].group", c["group"]) if "group" in c else ""
        out.append(Concept(name, tuple(_text(path, f"concepts[{i}].terms[{j}]", t)
                                       for j, t in enumerate(terms)), group))
    name = data.get("name", Path(str(path)).stem)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _problem(path, "'description' must be a string")
    return ConceptList(_text(path, "name", name), tuple(out), tuple(pairs), description)


def load_concepts(path: str | Path | None = None) -> ConceptList:
    """The shipped list (`path` None) or a user's JSON file, validated: a missing, unreadable
    or malformed file is one `InputFileError` line naming it and the problem."""
    p = SHIPPED if path is None else Path(path)
    return parse_concepts(read_json_file(p, max_bytes=4 << 20, what="concept list"), p)


# ----------------------------------------------------------------------------- scoring


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class ConceptBank:
    """The concept embeddings scoring needs: `targets` [K, T, D] (per concept and template,
    the mean of the L2-normalised embeddings of its terms: cosine is linear, so its dot product
    is the mean cosine over terms), `references` [T, D] (L2-normalised), and the names."""

    names: list[str]
    targets: np.ndarray
    references: np.ndarray

    def __post_init__(self) -> None:
        k, t, d = self.targets.shape
        if self.references.shape != (t, d) or len(self.names) != k:
            raise ValueError(f"concept arrays disagree: targets {self.targets.shape}, "
                             f"references {self.references.shape}, {len(self.names)} names")

    @property
    def dim(self) -> int:
        return int(self.targets.shape[2])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ConceptBank:
        """From the `/concepts/` arrays `encode` stores (`concept_arrays`'s keys)."""
        try:
            names = [str(s) for s in arrays["names"]]
            emb = l2n(arrays["prompt_embeddings"])
            concept = np.asarray(arrays["prompt_concept"], np.int64)
            template = np.asarray(arrays["prompt_template"], np.int64)
            refs = l2n(arrays["reference_embeddings"])
        except KeyError as e:
            raise ValueError(f"concept arrays lack {e}") from None
        k, t = len(names), len(refs)
        if emb.ndim != 2 or concept.shape != (len(emb),) or template.shape != (len(emb),) or \
                refs.ndim != 2 or refs.shape[1] != emb.shape[1] or not len(emb) or \
                concept.min() < 0 or concept.max() >= k or template.min() < 0 or \
                template.max() >= t:
            raise ValueError("concept arrays have inconsistent shapes or indices")
        targets = np.zeros((k, t, emb.shape[1]), np.float32)
        counts = np.zeros((k, t), np.float32)
        np.add.at(targets, (concept, template), emb)
        np.add.at(counts, (concept, template), 1.0)
        if (counts == 0).any():
            raise ValueError("a concept has no prompt for some template")
        return cls(names, targets / counts[..., None], refs)

    def presence(self, X: np.ndarray, scale: float) -> np.ndarray:
        """MONET concept presence scores [N, K] in (0, 1) of features X [N, D] (normalised
        here): the mean over templates of softmax([s_concept, s_reference] * scale)[0], i.e.
        sigmoid(scale * (s_concept - s_reference)); `scale` is the model's logit scale (MONET:
        exp(4.5944), CLIP's 100)."""
        x = l2n(X)
        s = np.einsum("nd,ktd->nkt", x, self.targets) - (x @ self.references.T)[:, None, :]
        return (1.0 / (1.0 + np.exp(-np.clip(scale * s, -60, 60)))).mean(axis=2)


@dataclass
class Standardizer:
    """Per-concept z-scores with the mean and spread of the rows it was fit on (the train
    split, never val or test); a spread of 0 counts as 1 (the concept then scores 0)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, scores: np.ndarray) -> Standardizer:
        std = scores.std(axis=0)
        return cls(scores.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (scores - self.mean) / self.std
