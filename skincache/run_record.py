"""`run.json`, typed: the one record a run folder keeps, for head runs and fine-tuning runs.

Every reader of a run folder goes through `read_run`, which validates the file before any field
is used: a hand-edited or damaged `run.json` (invalid JSON, `[]`, `cache: null`, `seed: "abc"`,
`"tta": "no"`) is one `InputFileError` line naming the file and the field, never a KeyError or a
string read as true. Values are refused, never coerced. `write_run` writes it atomically.

Old run folders (no `format_version`; `"model"` a string in head runs, a dict in fine-tuning
runs) still read: `model` always becomes a `RunModel`. Also here: the one rule for run names
(`check_run_name`), shared by fit-head and finetune. Imports only `_io` and `errors`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import read_json_file, write_json
from .errors import InputFileError, UsageError

RUN_FILE = "run.json"
#: 2: `model` is an object (`name`, `pretrained`, ...) in every kind of run.
#: 3: a head run fit on several caches lists them in `caches` (path, key, encoding_key, ...)
#: with its `fusion` ("early" or "late"); `cache` / `cache_key` are then the first cache's
#: path and the joined key. Versions 1-2 read as one cache.
RUN_FORMAT_VERSION = 3
FUSIONS = ("early", "late")
KINDS = ("head", "finetune")
MAX_RUN_JSON_BYTES = 64 << 20

#: A run name is one folder under --runs-dir: letters, digits, `.`, `_`, `-`, `+` (head names
#: such as `lp++` are the default run names' stem); no leading dot.
MAX_RUN_NAME = 100
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


def check_run_name(name: str, option: str = "--name") -> str:
    """`name` if it is a safe run-folder name, else one UsageError line: a name is a single
    folder under --runs-dir, so `../x`, `/abs`, `.` and 300 characters are refused before any
    work (they wrote outside --runs-dir, into its root, or failed after the fit)."""
    if not name or len(name) > MAX_RUN_NAME or not _NAME_RE.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise UsageError(f"{option} {shown!r}: a run name is 1-{MAX_RUN_NAME} letters, digits, "
                         "'.', '_', '-' or '+' (not starting with '.'; no '/'), got "
                         f"{len(name)} characters; choose another")
    return name


@dataclass
class RunModel:
    """The model a run's features or weights come from; `details` holds the rest of a
    fine-tuning run's model identity (checkpoint, weights sha256, preprocessing...)."""

    name: str
    pretrained: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pretrained": self.pretrained, **self.details}


@dataclass
class RunRecord:
    """A run folder's `run.json`. `extra` keeps every other key as written (timings,
    splits, the fine-tuning config...), so reading and writing back loses nothing."""

    kind: str
    model: RunModel | None  # None only in a fine-tuning record written before its model loaded
    classes: list[str]
    created: str = ""
    format_version: int = RUN_FORMAT_VERSION  # as read; written: always the current one
    # head runs
    head: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None
    cache_key: str | None = None
    encoding_key: str | None = None
    template_set: str | None = None
    seed: int = 0
    tta: bool = False
    shots: int | None = None
    #: several caches (format 3): one {path, key, encoding_key, model, ...} each, in order
    caches: list[dict[str, Any]] = field(default_factory=list)
    fusion: str | None = None
    # fine-tuning runs
    status: str | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "format_version": RUN_FORMAT_VERSION,
                               "classes": list(self.classes)}
        if self.model is not None:
            out["model"] = self.model.to_dict()
        if self.kind == "head":
            out.update(head=self.head, params=self.params, cache=self.cache,
                       cache_key=self.cache_key, encoding_key=self.encoding_key,
                       template_set=self.template_set, seed=self.seed, tta=self.tta,
                       shots=self.shots)
            if self.caches:
                out.update(caches=self.caches, fusion=self.fusion)
        if self.status is not None:
            out["status"] = self.status
        out.update(self.extra)
        out["evaluations"] = self.evaluations
        if self.created:
            out["created"] = self.created
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = RUN_FILE) -> RunRecord:
        """Validate `data` (parsed run.json) into a record; one InputFileError naming
        `where` and the field for anything missing or of the wrong type."""
        return _parse(data, str(where))


# --------------------------------------------------------------------------- validation

_TYPES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
          list: "a list"}


def _bad(where: str, key: str, problem: str) -> InputFileError:
    return InputFileError(f"{where}: field '{key}' {problem}; the run folder was edited or "
                          "damaged (restore run.json or fit the run again)")


def _get(d: dict, where: str, key: str, kind: type, *, required: bool, none_ok: bool = False,
         default: Any = None) -> Any:
    if key not in d:
        if required:
            raise _bad(where, key, "is missing")
        return default
    v = d[key]
    if v is None and none_ok:
        return None
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise _bad(where, key, f"must be {_TYPES[kind]}, got {v!r:.60}")
    return v


def _model(d: dict, where: str) -> RunModel | None:
    m = d.get("model")
    if m is None and d.get("kind") == "finetune":
        return None
    if isinstance(m, str):  # format 1 head runs: name here, pretrained beside it
        pre = _get(d, where, "pretrained", str, required=False, none_ok=True, default="")
        return RunModel(m, pre or "")
    if not isinstance(m, dict):
        raise _bad(where, "model", "must be an object (or a model name), got "
                   f"{'nothing' if m is None else repr(m)[:60]}")
    name = m.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(where, "model.name", f"must be a model name, got {name!r:.60}")
    pre = m.get("pretrained") or ""
    if not isinstance(pre, str):
        raise _bad(where, "model.pretrained", f"must be a string, got {pre!r:.60}")
    return RunModel(name, pre, {k: v for k, v in m.items() if k not in ("name", "pretrained")})


_TYPED = {"kind", "format_version", "model", "pretrained", "classes", "created", "head",
          "params", "cache", "cache_key", "encoding_key", "template_set", "seed", "tta", "shots",
          "status", "evaluations", "caches", "fusion"}


def _parse(d: Any, where: str) -> RunRecord:
    if not isinstance(d, dict):
        raise InputFileError(f"{where}: not a JSON object (a run record); the run folder was "
                             "edited or damaged (restore run.json or fit the run again)")
    kind = _get(d, where, "kind", str, required=True)
    if kind not in KINDS:
        raise _bad(where, "kind", f"must be one of {list(KINDS)}, got {kind!r:.60}")
    version = _get(d, where, "format_version", int, required=False, default=1)
    if version > RUN_FORMAT_VERSION:
        raise _bad(where, "format_version", f"is {version}, newer than this skincache reads "
                   f"({RUN_FORMAT_VERSION}); upgrade skincache")
    classes = _get(d, where, "classes", list, required=kind == "head", default=[])
    if not all(isinstance(c, str) for c in classes):
        raise _bad(where, "classes", "must be a list of class names")
    evaluations = _get(d, where, "evaluations", list, required=False, default=[])
    if not all(isinstance(e, dict) for e in evaluations):
        raise _bad(where, "evaluations", "must be a list of objects")
    rec = RunRecord(kind=kind, model=_model(d, where), classes=list(classes),
                    created=_get(d, where, "created", str, required=False, default=""),
                    format_version=version, evaluations=list(evaluations),
                    extra={k: v for k, v in d.items() if k not in _TYPED})
    if kind == "head":
        for key in ("head", "cache", "cache_key", "encoding_key"):
            setattr(rec, key, _get(d, where, key, str, required=True))
            if not getattr(rec, key):
                raise _bad(where, key, "is empty")
        rec.params = _get(d, where, "params", dict, required=False, default={})
        rec.template_set = _get(d, where, "template_set", str, required=False, default="all")
        rec.seed = _get(d, where, "seed", int, required=False, default=0)
        rec.tta = _get(d, where, "tta", bool, required=False, default=False)
        rec.shots = _get(d, where, "shots", int, required=False, none_ok=True)
        rec.caches, rec.fusion = _caches(d, where)
    else:
        rec.status = _get(d, where, "status", str, required=True)
        _get(d, where, "config", dict, required=True)
    return rec


def _caches(d: dict, where: str) -> tuple[list[dict[str, Any]], str | None]:
    """`caches` and `fusion` of a head run: none (one cache), or >= 2 entries each with a
    path, key and encoding key, and the fusion that joined them."""
    caches = _get(d, where, "caches", list, required=False, default=[])
    if not caches:
        return [], None
    if len(caches) < 2:
        raise _bad(where, "caches", f"lists {len(caches)} cache (a fused run has >= 2)")
    for i, c in enumerate(caches):
        if not isinstance(c, dict):
            raise _bad(where, f"caches[{i}]", "must be an object")
        for key in ("path", "key", "encoding_key"):
            v = c.get(key)
            if not isinstance(v, str) or not v:
                raise _bad(where, f"caches[{i}].{key}", f"must be a non-empty string, got "
                           f"{v!r:.60}")
    fusion = _get(d, where, "fusion", str, required=True)
    if fusion not in FUSIONS:
        raise _bad(where, "fusion", f"must be one of {list(FUSIONS)}, got {fusion!r:.60}")
    return [dict(c) for c in caches], fusion


def run_file(path: str | Path) -> Path:
    """`run.json` of a run folder (or the file itself when given)."""
    p = Path(path)
    return p if p.name == RUN_FILE and not p.is_dir() else p / RUN_FILE


def read_run(path: str | Path) -> RunRecord:
    """The validated record of a run folder (or of a `run.json` path). A missing file is a
    NotFoundError; anything unreadable or invalid one InputFileError line naming the file."""
    f = run_file(path)
    return RunRecord.from_dict(read_json_file(f, max_bytes=MAX_RUN_JSON_BYTES, what="run record"),
                               f)


def write_run(path: str | Path, record: RunRecord) -> Path:
    """Write `record` as the run folder's `run.json` (or to the `run.json` path), atomically:
    a kill mid-write leaves the old record."""
    return write_json(run_file(path), record.to_dict())
