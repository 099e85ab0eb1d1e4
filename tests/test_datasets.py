"""Data loaders: BEIR folders, STS CSV files and the SQuAD-to-BEIR converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uec_rag.datasets import (
    DataFormatError,
    convert_squad_to_beir,
    load_beir,
    load_sts,
)

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Tides",
            "paragraphs": [
                {
                    "context": "Tides rise and fall twice a day because of the Moon.",
                    "qas": [
                        {"id": "t1", "question": "What causes tides?", "answers": []},
                        {"id": "t2", "question": "How often do tides rise?", "answers": []},
                    ],
                },
                {
                    "context": "Spring tides happen at new and full moon.",
                    "qas": [{"id": "t3", "question": "When are spring tides?", "answers": []}],
                },
            ],
        },
        {
            "title": "Бумага",
            "paragraphs": [
                {
                    "context": "Бумагу изобрели в Китае, во II веке.",
                    "qas": [{"id": "p1", "question": "Где изобрели бумагу?", "answers": []}],
                }
            ],
        },
    ],
}


def _write_beir(root: Path, qrels_lines: list[str]) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "T", "text": "one"}\n{"_id": "d2", "text": "two"}\n',
        encoding="utf-8",
    )
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "first?"}\n', encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels_lines),
        encoding="utf-8",
    )
    return root


def test_squad_converter_round_trips_through_load_beir(tmp_path):
    source = tmp_path / "squad.json"
    source.write_text(json.dumps(SQUAD, ensure_ascii=False), encoding="utf-8")
    folder = convert_squad_to_beir(source, tmp_path / "beir")

    dataset = load_beir(folder)
    assert dataset.corpus == {
        "a0p0": "Tides\n\nTides rise and fall twice a day because of the Moon.",
        "a0p1": "Tides\n\nSpring tides happen at new and full moon.",
        "a1p0": "Бумага\n\nБумагу изобрели в Китае, во II веке.",
    }
    assert dataset.queries["p1"] == "Где изобрели бумагу?"
    assert dataset.qrels == {
        "t1": {"a0p0": 1},
        "t2": {"a0p0": 1},
        "t3": {"a0p1": 1},
        "p1": {"a1p0": 1},
    }
    assert not (folder / "qrels" / "train.tsv").exists()


def test_squad_converter_splits_by_article(tmp_path):
    source = tmp_path / "squad.json"
    source.write_text(json.dumps(SQUAD), encoding="utf-8")
    folder = convert_squad_to_beir(source, tmp_path / "beir", train_fraction=0.5, seed=3)

    train = load_beir(folder, "train")
    test = load_beir(folder, "test")
    assert len(train.queries) + len(test.queries) == 4
    assert set(train.queries).isdisjoint(test.queries)
    # Questions of one article stay together.
    tides = {"t1", "t2", "t3"}
    assert tides <= set(train.queries) or tides <= set(test.queries)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"version": "1"}, "missing field 'data'"),
        ({"data": [{"title": "x"}]}, r"data\[0\]: missing field 'paragraphs'"),
        (
            {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "a"}]}]}]},
            r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'question'",
        ),
        (
            {"data": [{"paragraphs": [{"context": 5, "qas": []}]}]},
            "field 'context' must be str, got int",
        ),
    ],
)
def test_squad_converter_names_bad_field(tmp_path, document, message):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        convert_squad_to_beir(source, tmp_path / "out")


def test_squad_converter_reports_json_line(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text('{"data": [\n  {"title": "x",\n  oops}\n]}', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json, line 3: invalid JSON") as info:
        convert_squad_to_beir(source, tmp_path / "out")
    assert info.value.line == 3


def test_squad_converter_rejects_duplicate_id(tmp_path):
    document = {
        "data": [
            {
                "paragraphs": [
                    {"context": "c", "qas": [{"id": "a", "question": "x?"}]},
                    {"context": "d", "qas": [{"id": "a", "question": "y?"}]},
                ]
            }
        ]
    }
    source = tmp_path / "dup.json"
    source.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(DataFormatError, match="question id 'a' appears twice"):
        convert_squad_to_beir(source, tmp_path / "out")


def test_load_sts_handles_quoted_commas(tmp_path):
    path = tmp_path / "sts-dev.csv"
    path.write_text(
        "A man plays a guitar.,A man is playing guitar.,4.8\n"
        '"Yes, it is raining.","It rains, yes.",3.5\n'
        "\n"
        "Кошка спит.,Собака лает.,0\n",
        encoding="utf-8",
    )
    dataset = load_sts(path)
    assert dataset.name == "sts-dev"
    assert len(dataset) == 3
    assert dataset.sentences1[1] == "Yes, it is raining."
    assert dataset.sentences2[1] == "It rains, yes."
    np.testing.assert_array_equal(dataset.scores, [4.8, 3.5, 0.0])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b,1\nonly,two\n", r"line 2: expected 3 comma-separated fields"),
        ("a,b,1\na,b,high\n", r"line 2: field 'score' must be a number, got 'high'"),
        ("a,b,nan\n", r"line 1: field 'score' must be finite"),
        ("a, ,1\n", r"line 1: field 'sentence2' is empty"),
        ("a,b,c,1\n", r"line 1: expected 3 comma-separated fields .* got 4"),
        ("\n\n", "no sentence pairs"),
    ],
)
def test_load_sts_names_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message) as info:
        load_sts(path)
    assert info.value.path == path


def test_load_sts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.csv"):
        load_sts(tmp_path / "nothere.csv")


def test_load_beir_qrels_error_names_line(tmp_path):
    root = _write_beir(tmp_path / "set", ["q1\td1\t1", "q1\td9\t1"])
    with pytest.raises(DataFormatError, match=r"test\.tsv, line 3: field 'corpus-id': 'd9'"):
        load_beir(root)


def test_load_beir_unknown_query_names_line(tmp_path):
    root = _write_beir(tmp_path / "set", ["q7\td1\t1"])
    with pytest.raises(DataFormatError, match=r"line 2: field 'query-id': 'q7'"):
        load_beir(root)


def test_load_beir_bad_score(tmp_path):
    root = _write_beir(tmp_path / "set", ["q1\td1\tyes"])
    with pytest.raises(DataFormatError, match=r"line 2: field 'score' must be an integer"):
        load_beir(root)


def test_load_beir_missing_split_lists_present(tmp_path):
    root = _write_beir(tmp_path / "set", ["q1\td1\t1"])
    with pytest.raises(FileNotFoundError, match=r"splits present .*\['test'\]"):
        load_beir(root, "train")


@pytest.mark.slow
def test_real_data_loads(data_dir):
    xquad = load_beir(data_dir / "xquad-ar")
    assert len(xquad.corpus) == 240
    assert len(xquad.queries) == 960
    train = load_beir(data_dir / "xquad-ar", "train")
    assert set(train.queries).isdisjoint(xquad.queries)

    sts = load_sts(data_dir / "stsb" / "stsb-zh-test.csv")
    assert len(sts) == 1379
    assert sts.scores.min() >= 0
    assert sts.scores.max() <= 5
