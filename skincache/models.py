"""Loading open_clip models and describing their preprocessing.

A model is named the open_clip way: an architecture plus a pretrained tag (`ViT-B-32` +
`openai`), an `hf-hub:` id (BiomedCLIP, DermLIP), or an architecture plus a local checkpoint
file. The package ships `skincache-tiny`, a small random-initialised config, so that tests and
the demo run offline through exactly the code path a real model takes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skincache import derm_models
from skincache._io import file_safe
from skincache.defaults import TINY_MODEL
from skincache.errors import ModelError, NotFoundError, UsageError

#: The tag `--pretrained` takes when not given, for architectures that have it.
DEFAULT_PRETRAINED = "openai"
TINY_SEED = 0
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def _register_configs() -> None:
    """Make the shipped configs known to open_clip (once per process)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def pretrained_tags(name: str) -> list[str]:
    """open_clip's pretrained tags of an architecture: [] for configs without released
    weights (`skincache-tiny`) and for hf-hub ids, which carry their own weights."""
    if name.startswith("hf-hub:"):
        return []
    _register_configs()
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(name))


def list_architectures(filter_: str = "") -> list[tuple[str, list[str]]]:
    """(architecture, its pretrained tags) for every model open_clip can build, skincache's
    shipped configs included; `filter_` keeps those whose name or a tag contains it (any
    case). What `skincache models` prints."""
    _register_configs()
    import open_clip

    f = filter_.lower()
    rows = []
    for name in sorted(open_clip.list_models(), key=str.lower):
        tags = list(open_clip.list_pretrained_tags_by_model(name))
        if not f or f in name.lower() or any(f in t.lower() for t in tags):
            rows.append((name, tags))
    return rows


def resolve_pretrained(name: str, pretrained: str | None, checkpoint: str | None = None
                       ) -> str | None:
    """The pretrained tag to load, or None for random initialisation.

    `pretrained=None` means "not given": `openai` where the architecture has it, none for an
    architecture without tags (the shipped `skincache-tiny` runs as named). `''` asks for
    random initialisation. A tag the architecture does not have is a UsageError that lists the
    ones it has, so a user never has to guess. A checkpoint or an hf-hub id brings its own
    weights: no tag. A derm short name (`clip-b16`) defaults to its registry entry's tag; one
    whose weights are a checkpoint file (`monet`) without `checkpoint` is a ModelError saying
    where the file comes from."""
    entry = derm_models.by_name(name)
    if entry is not None:
        if entry.weights == "checkpoint" and not checkpoint:
            raise ModelError(derm_models.load_problem(entry, checkpoint))
        name = entry.model
        if pretrained is None and entry.pretrained and not checkpoint:
            pretrained = entry.pretrained
    if checkpoint or name.startswith("hf-hub:"):
        return None
    if pretrained == "":
        return None
    tags = pretrained_tags(name)
    if pretrained is None:
        if not tags:
            return None
        if DEFAULT_PRETRAINED in tags:
            return DEFAULT_PRETRAINED
        raise UsageError(f"{name} has no '{DEFAULT_PRETRAINED}' weights; choose --pretrained "
                         f"from: {', '.join(tags)} (or --pretrained '' for random init)")
    check_pretrained(name, pretrained, tags)
    return pretrained


def check_pretrained(name: str, tag: str, tags: list[str] | None = None) -> None:
    """UsageError unless `tag` is one of the architecture's tags or a weights file."""
    tags = pretrained_tags(name) if tags is None else tags
    clean = tag.lower().replace("-", "_")
    if clean in {t.lower().replace("-", "_") for t in tags} or Path(tag).is_file():
        return
    if not tags:
        raise UsageError(f"--pretrained {tag!r}: {name} has no pretrained weights in "
                         "open_clip; use --pretrained '' (random init) or --checkpoint FILE")
    raise UsageError(f"--pretrained {tag!r} is not a tag of {name}; its tags: "
                     f"{', '.join(tags)} (`skincache models {name}` lists them)")


def derm_status(entry: derm_models.DermModel) -> str:
    """Whether `entry` loads in this install, in a few words, without the network: the
    architecture is one open_clip knows (or the hub config brings it), the packages its
    towers need import, no fork is required, a gated repo has a token. 'yes' may still fail
    at download time (no network, a revoked repo); that failure is one line too."""
    if entry.fork:
        return "no: needs the Derm1M fork of open_clip"
    missing = entry.missing_packages()
    if missing:
        return f"no: needs {', '.join(missing)}"
    if entry.gated and not derm_models.has_token() and not derm_models.in_local_cache(entry):
        return "no: gated, needs HF_TOKEN"
    _register_configs()
    import open_clip

    if not entry.is_hub and entry.model not in open_clip.list_models():
        return f"no: open_clip lacks {entry.model}"
    if entry.architecture == "unverified":
        return "unverified: the hub config decides"
    if entry.weights == "checkpoint":
        return "yes, with --checkpoint FILE"
    if entry.is_hub:
        return "yes, cached" if derm_models.in_local_cache(entry) else "yes, from the Hub"
    return "yes, open_clip downloads the tag"


def derm_table() -> list[dict]:
    """`skincache models --derm`: one row per registry entry, with `loads` (derm_status)."""
    return [{"name": e.name, "title": e.title, "source": e.source,
             "architecture": e.architecture, "input_size": e.input_size,
             "text_tower": e.text_tower, "license": e.license, "loads": derm_status(e),
             "unverified": list(e.unverified)}
            for e in derm_models.registry().values()]


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load: what the cache key is made of for the model.

    `pretrained` is an open_clip tag (`openai`, `laion2b_s34b_b79k`) or None for random
    initialisation; `checkpoint` a local weights file (loaded with `weights_only=True`).
    Names with an `hf-hub:` prefix carry their own weights and preprocessing. A derm short
    name (`dermlip-b16`, `skincache models --derm`) is stored as the id it stands for, so the
    cache key and the cache's header name the weights, not the alias.
    """

    name: str
    pretrained: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", derm_models.resolve(self.name))

    @property
    def slug(self) -> str:
        """A short file-name-safe label for cache names."""
        base = self.name.removeprefix("hf-hub:").split("/")[-1]
        tag = self.pretrained or (Path(self.checkpoint).stem if self.checkpoint else "")
        if not tag and self.name == TINY_MODEL:
            tag = f"seed{TINY_SEED}"
        return file_safe(f"{base}-{tag}" if tag else base)

    def identity(self) -> dict:
        """What identifies the weights without loading them (part of the cache key).

        A local checkpoint is identified by the sha256 of its bytes, not its path."""
        ident = {"name": self.name, "pretrained": self.pretrained, "checkpoint_sha256": None}
        if self.checkpoint:
            ident["checkpoint_sha256"] = file_sha256(self.checkpoint)
        if self.name == TINY_MODEL:
            ident["init_seed"] = TINY_SEED
        return ident


@dataclass(frozen=True)
class PreprocessSpec:
    """The model's own eval preprocessing, as open_clip defines it (recorded in the cache)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict) -> PreprocessSpec:
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
            fill_color=int(cfg.get("fill_color", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        d = json.loads(text)
        d["size"] = tuple(d["size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    def open_clip_transform(self):
        """open_clip's own eval transform for this spec: the reference the fast paths match."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(
            size=self.size, mean=self.mean, std=self.std, interpolation=self.interpolation,
            resize_mode=self.resize_mode, fill_color=self.fill_color,
        )
        return image_transform_v2(cfg, is_train=False)


@dataclass
class LoadedModel:
    """A ready model with everything the encoder needs to know about it."""

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: object
    preprocess: PreprocessSpec
    embed_dim: int
    logit_scale: float
    weights_sha256: str

    @torch.no_grad()
    def encode_text(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens).float()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime): a checkpoint of several
    hundred MB is hashed once per process, not at every use of its identity."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never ends
        from skincache.errors import InputFileError

        raise InputFileError(f"{path}: not a regular file")
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A checksum of the weights actually loaded, whatever their source."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """Create the open_clip model for `spec` in eval mode on `device`.

    Raises FileNotFoundError for a missing checkpoint and RuntimeError (with the name) when
    open_clip cannot resolve the model or download its weights."""
    _register_configs()
    import open_clip

    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise NotFoundError(f"checkpoint not found: {spec.checkpoint}")
    is_hub = spec.name.startswith("hf-hub:")
    if not is_hub and spec.name not in open_clip.list_models():
        raise ModelError(
            f"unknown model '{spec.name}': use an open_clip architecture "
            f"(`skincache models` lists them), a derm short name "
            f"({', '.join(derm_models.short_names())}), an 'hf-hub:org/repo' id, or '{TINY_MODEL}'"
        )
    entry = derm_models.by_model(spec.name)
    problem = derm_models.load_problem(entry, spec.checkpoint) if entry else ""
    if problem:
        raise ModelError(problem)
    if spec.pretrained and not (is_hub or spec.checkpoint):
        check_pretrained(spec.name, spec.pretrained)
    random_init = not (is_hub or spec.pretrained)  # a checkpoint is loaded right after
    needs_hub = is_hub or (spec.pretrained and not spec.checkpoint)
    try:
        with torch.random.fork_rng(devices=[]), _held_logs(random_init), \
                _offline_if_unreachable(bool(needs_hub)) as offline:
            torch.manual_seed(TINY_SEED)
            model = open_clip.create_model(
                spec.name,
                pretrained=None if (is_hub or spec.checkpoint) else spec.pretrained,
                weights_only=True,
                force_quick_gelu=_tag_wants_quick_gelu(spec),
            )
    except Exception as e:  # open_clip raises many types for unreachable hubs / unknown tags
        what = f"model '{spec.name}' (pretrained={spec.pretrained})"
        if offline:  # the cause is known: open_clip's own long text would only repeat it
            raise ModelError(
                f"could not load {what}: {offline}, and the weights are not in the local "
                "Hugging Face cache; run this once where the network is reachable and copy its "
                "~/.cache/huggingface here, or pass --checkpoint FILE") from e
        if is_hub and _refused_access(e):
            repo = spec.name.removeprefix("hf-hub:")
            raise ModelError(
                f"could not load {what}: the Hugging Face Hub refused access (gated or "
                f"private); accept its terms at https://huggingface.co/{repo}, then set "
                "HF_TOKEN or run `huggingface-cli login`") from e
        raise ModelError(f"could not load {what}: {e}") from e
    if spec.checkpoint:
        load_checkpoint_file(model, spec)
    model.eval().to(device)
    preprocess = PreprocessSpec.from_open_clip(model.visual.preprocess_cfg)
    tokenizer = open_clip.get_tokenizer(spec.name)
    embed_dim = int(model.text_projection.shape[1]) if _has_proj(model) else _probe_dim(model)
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.exp().item()),
        weights_sha256=state_dict_sha256(model),
    )


def _tag_wants_quick_gelu(spec: ModelSpec) -> bool:
    """Whether the pretrained tag was trained with QuickGELU while the architecture's config
    says GELU (`ViT-B-32` + `openai`, `ViT-L-14` + `dfn2b`, ...). open_clip 3.x builds the
    config's activation and only warns about the mismatch, which changes every feature; its
    own tag metadata says which activation the weights need, so that is what is built."""
    import open_clip

    if not spec.pretrained or spec.checkpoint or spec.name.startswith("hf-hub:"):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or {}
    model_cfg = open_clip.get_model_config(spec.name) or {}
    return bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu")


def _refused_access(e: BaseException) -> bool:
    """The Hub answered 401/403 or named the repo gated, anywhere in the exception chain
    (open_clip wraps huggingface_hub's errors in its own)."""
    while e is not None:
        text = f"{type(e).__name__} {e}"
        if any(m in text for m in ("GatedRepoError", "401 Client Error", "403 Client Error",
                                   "Unauthorized", "gated repo")):
            return True
        e = e.__cause__ or e.__context__
    return False


def checkpoint_problem(path: str | Path, e: BaseException) -> str:
    """What is wrong with a weights file, in words, from the exception loading it raised."""
    import pickle

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            return ("a raw Python pickle, not a weights-only torch checkpoint (skincache never "
                    "unpickles: it could run code)")
    except OSError:
        pass
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else type(e).__name__
    if type(e).__name__ == "SafetensorError":
        return f"not a valid safetensors file ({first})"
    if "Unsupported global" in text or "Unsupported class" in text:
        return ("not a weights-only checkpoint: loading it would unpickle arbitrary objects "
                "(and could run code), which skincache refuses")
    if isinstance(e, EOFError) or any(m in text for m in (
            "Unsupported operand", "invalid load key", "failed finding central directory",
            "PytorchStreamReader", "could not find MARK", "truncated")):
        return "not a torch checkpoint (unreadable or truncated bytes)"
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text.lower():
        return ("not a weights-only checkpoint: loading it would unpickle arbitrary objects "
                "(and could run code), which skincache refuses")
    if "Error(s) in loading state_dict" in text:
        return "its weights do not fit this model (missing/unexpected keys or shape mismatch)"
    return first


def load_checkpoint_file(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Load `spec.checkpoint` into `model` with `weights_only=True` (never unpickles); any
    failure is one `InputFileError` naming the file and what is wrong with it."""
    import open_clip

    from skincache.errors import InputFileError

    path = str(spec.checkpoint)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputFileError(f"{path}: not a regular file")
    if Path(path).suffix.lower() in (".npz", ".npy"):
        raise InputFileError(f"{path}: numpy weight files are not supported; use a .pt, .bin "
                             "or .safetensors checkpoint")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error says it
            warnings.simplefilter("ignore", UserWarning)
            open_clip.load_checkpoint(model, path, weights_only=True)
    except Exception as e:
        raise InputFileError(f"{path}: cannot load as weights for {spec.name}: "
                             f"{checkpoint_problem(path, e)}") from None


@contextlib.contextmanager
def _offline_if_unreachable(needs_hub: bool):
    """When the Hub cannot be reached, load in offline mode: weights already in the local cache
    still load, missing ones fail at once instead of after a minute of retries. Yields the
    reason when offline, else ''."""
    if not needs_hub:
        yield ""
        return
    from huggingface_hub import constants

    from skincache.data.fetch import FetchError, check_online

    try:
        check_online()
        reason = ""
    except FetchError as e:
        reason = str(e).rstrip(".")
    if not reason:
        yield ""
        return
    before_env, before_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = before_const
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_logs(random_init: bool):
    """Hold back what open_clip logs while it builds a model. When loading fails, its
    `ERROR:root:...` lines would print before our one-line error, which already carries the
    cause: they are dropped. When it succeeds, warnings are passed on, except the "no
    pretrained weights" one when random initialisation is the intent."""
    root = logging.getLogger()
    held = _Collect()
    saved = root.handlers[:]
    root.handlers = [held]  # also keeps open_clip's logging.error() from calling basicConfig
    ok = False
    try:
        yield
        ok = True
    finally:
        root.handlers = saved
        if ok and not random_init:
            for record in held.records:
                if record.levelno >= logging.WARNING:
                    logging.getLogger(record.name).handle(record)


def _has_proj(model: torch.nn.Module) -> bool:
    proj = getattr(model, "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2


@torch.no_grad()
def _probe_dim(model: torch.nn.Module) -> int:
    size = model.visual.preprocess_cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    p = next(model.parameters())
    x = torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype)
    return int(model.encode_image(x).shape[-1])
