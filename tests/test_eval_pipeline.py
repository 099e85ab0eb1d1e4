"""The evaluation pipeline end to end: data discovery, methods, tuning, store, report, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from uec_rag.cli import main
from uec_rag.cli.eval import find_sample_corpus, resolve_data_paths
from uec_rag.coefficients import CoefficientRule
from uec_rag.evaluation.embedding_store import EmbeddingStore
from uec_rag.evaluation.methods import (
    ORACLE,
    UEC_TUNED,
    WEIGHTED,
    build_methods,
    convolution_group,
    pair_scores,
    simplex_grid,
    top_hit_sigma,
    uec_grid,
)
from uec_rag.evaluation.plots import plot_coefficients, plot_reliability
from uec_rag.evaluation.report import markdown_report, robustness_losses, terminal_report
from uec_rag.evaluation.runner import (
    RetrievalTask,
    StsTask,
    encode_tasks,
    find_tasks,
    run_evaluation,
)
from uec_rag.fusion import method_scores
from uec_rag.gaussian import GaussianEmbedding
from uec_rag.similarity import uncertainty_similarity

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_corpus"


class HashMember:
    """A deterministic stand-in encoder: bag of hashed word prefixes plus per-text noise.

    Its variance grows with ``noise`` and varies per text, so coefficients differ
    between members and items.
    """

    def __init__(self, name: str, dim: int, noise: float) -> None:
        self.name = name
        self.dim = dim
        self.noise = noise
        self.calls = 0

    reference_trace = 0.05

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}|{self.dim}|{self.noise}".encode()).hexdigest()

    def encode(self, texts, kind="document", *, batch_size=None, show_progress=None):
        self.calls += 1
        means = np.zeros((len(texts), self.dim))
        for row, text in enumerate(texts):
            for word in text.lower().split():
                seed = int(hashlib.md5(word[:5].encode()).hexdigest()[:8], 16)
                means[row] += np.random.default_rng(seed).normal(size=self.dim)
            seed = int(hashlib.md5(text.encode()).hexdigest()[:8], 16)
            means[row] += self.noise * np.random.default_rng(seed).normal(size=self.dim)
            means[row] /= np.linalg.norm(means[row]) + 1e-9
        lengths = np.array([len(text) % 5 + 1 for text in texts], dtype=float)[:, None]
        variance = np.full_like(means, 1e-4 * (1 + self.noise)) * lengths
        return GaussianEmbedding(means, variance)


def _members() -> list[HashMember]:
    return [HashMember("a", 32, 0.5), HashMember("b", 64, 1.0), HashMember("c", 32, 2.0)]


def _sts_folder(root: Path) -> Path:
    folder = root / "stsb"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["river", "sea", "tea", "coffee", "book", "paper", "glacier", "snow", "bee", "dance"]
    for split, size in (("dev", 30), ("test", 40)):
        lines = []
        for _ in range(size):
            left = rng.choice(words, 4)
            overlap = int(rng.integers(0, 5))
            right = list(left[:overlap]) + list(rng.choice(words, 4 - overlap))
            lines.append(f"{' '.join(left)},{' '.join(right)},{overlap * 1.25}")
        (folder / f"toy-{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for name in ("sample-en", "sample-ru"):
        shutil.copytree(SAMPLE / name, root / name)
    _sts_folder(root)
    (root / "tatoeba").mkdir()
    return root


def test_find_tasks_discovers_beir_and_sts(data_root):
    tasks = find_tasks([data_root])
    assert [task.name for task in tasks] == ["sample-en", "sample-ru", "toy"]
    assert isinstance(tasks[0], RetrievalTask)
    assert isinstance(tasks[2], StsTask)
    assert tasks[2].dev_path == data_root / "stsb" / "toy-dev.csv"

    single = find_tasks([data_root / "stsb" / "toy-test.csv", data_root / "sample-en"])
    assert [task.name for task in single] == ["sample-en", "toy"]


def test_find_tasks_rejects_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data set found"):
        find_tasks([tmp_path])
    with pytest.raises(FileNotFoundError, match="not found"):
        find_tasks([tmp_path / "missing"])


def test_simplex_and_uec_grids_have_equal_budget():
    weights = simplex_grid(3, 28)
    assert len(weights) == 28
    assert all(abs(sum(w) - 1) < 1e-12 for w in weights)
    assert (2 / 6, 2 / 6, 2 / 6) in weights  # step 1/6 contains the uniform weights
    assert len(simplex_grid(4, 28)) == 20
    for normalizable in (True, False):
        rules = uec_grid(28, normalizable=normalizable, raw_trace_scale=0.1)
        assert len(rules) == 28
        assert len(set(rules)) == 28
        assert CoefficientRule() in rules  # UEC's default is one of the grid points
        assert all(rule.normalize_traces is False for rule in rules) or normalizable


def test_convolution_group_picks_equal_dimensions():
    assert convolution_group([384, 768, 384]) == (0, 2)
    assert convolution_group([384, 768, 384, 384]) == (0, 2, 3)
    labels = [entry.label for entry in build_methods(["minilm", "mpnet", "e5"], [384, 768, 384])]
    assert "UEC, convolution (minilm+e5)" in labels
    assert "uniform, convolution (minilm+e5)" in labels


def test_pair_scores_equal_dense_diagonal():
    members = _members()
    left_texts = ["the bee dance", "tea and coffee", "a glacier of snow", "paper book"]
    right_texts = ["bee dance angle", "coffee beans", "snow melts", "river sea"]
    left = [m.encode(left_texts) for m in members]
    right = [m.encode(right_texts) for m in members]
    for entry in build_methods(["a", "b", "c"], [32, 64, 32]):
        if entry.method is None or entry.method.kind == "rrf":
            continue
        subset_left = [left[p] for p in entry.members]
        subset_right = [right[p] for p in entry.members]
        dense = method_scores(entry.method, subset_left, subset_right, reference_traces=None)
        paired = pair_scores(entry.method, subset_left, subset_right)
        np.testing.assert_allclose(
            paired, np.diag(dense.scores), rtol=1e-5, atol=1e-6, err_msg=entry.label
        )


def test_top_hit_sigma_matches_full_similarity():
    members = _members()
    queries = [m.encode(["bee dance", "tea"]) for m in members]
    documents = [m.encode(["bees dance", "tea leaves", "snow"]) for m in members]
    for entry in build_methods(["a", "b", "c"], [32, 64, 32]):
        if entry.method is None or entry.method.kind != "uec":
            continue
        q = [queries[p] for p in entry.members]
        d = [documents[p] for p in entry.members]
        top = np.array([2, 0])
        sigma = top_hit_sigma(entry.method, q, d, top, None)
        from uec_rag.combine import combine_members

        combined_q, _ = combine_members(q, entry.method.combine, entry.method.rule)
        combined_d, _ = combine_members(d, entry.method.combine, entry.method.rule)
        full = uncertainty_similarity(combined_q, combined_d).sigma_s
        np.testing.assert_allclose(sigma, full[[0, 1], top], rtol=1e-5)


def test_run_evaluation_produces_every_row(data_root, tmp_path):
    members = _members()
    store = EmbeddingStore(tmp_path / "store")
    results = run_evaluation(find_tasks([data_root]), members, store=store)
    expected_rows = [entry.label for entry in build_methods(["a", "b", "c"], [32, 64, 32])]

    retrieval, _, sts = results["datasets"]
    assert list(retrieval["methods"])[: len(expected_rows)] == expected_rows
    assert list(sts["methods"]) == expected_rows
    assert retrieval["n_test_queries"] == 8
    assert retrieval["n_train_queries"] == 4
    for label, row in retrieval["methods"].items():
        for metric in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
            assert 0.0 <= row[metric] <= 1.0, (label, metric)
    for label, row in sts["methods"].items():
        assert -1.0 <= row["spearman"] <= 1.0, label

    singles = {label: retrieval["methods"][label]["ndcg@10"] for label in ("a", "b", "c")}
    assert retrieval["methods"][ORACLE]["ndcg@10"] == max(singles.values())
    assert retrieval["methods"][ORACLE]["settings"]["picked_on"] == "test"
    for label in (WEIGHTED, UEC_TUNED):
        assert retrieval["methods"][label]["settings"]["grid_points"] == 28
        assert sts["methods"][label]["settings"]["grid_points"] == 28
    coefficients = retrieval["coefficients"]["UEC, direct sum"]
    assert sum(coefficients.values()) == pytest.approx(1.0, abs=1e-5)
    json.dumps(results, allow_nan=True)


def test_tuning_ignores_test_judgements(data_root, tmp_path):
    tasks = [RetrievalTask("sample-ru", data_root / "sample-ru")]
    first = run_evaluation(tasks, _members(), store=EmbeddingStore(tmp_path / "s"))

    # Point every test question at the wrong passage: tuned settings must not move.
    qrels = data_root / "sample-ru" / "qrels" / "test.tsv"
    lines = qrels.read_text(encoding="utf-8").splitlines()
    lines = [lines[0]] + [f"{line.split()[0]}\tp02\t1" for line in lines[1:]]
    qrels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    second = run_evaluation(tasks, _members(), store=EmbeddingStore(tmp_path / "s"))

    for label in (WEIGHTED, UEC_TUNED):
        before = first["datasets"][0]["methods"][label]["settings"]
        after = second["datasets"][0]["methods"][label]["settings"]
        assert before == after, label
    assert first["datasets"][0]["methods"]["a"]["ndcg@10"] != pytest.approx(
        second["datasets"][0]["methods"]["a"]["ndcg@10"]
    )


def test_embedding_store_reuses_files(data_root, tmp_path):
    tasks = find_tasks([data_root / "sample-en"])
    store = EmbeddingStore(tmp_path / "store")
    members = _members()
    first = run_evaluation(tasks, members, store=store)
    calls = [member.calls for member in members]
    second = run_evaluation(tasks, members, store=EmbeddingStore(tmp_path / "store"))

    assert [member.calls for member in members] == calls
    assert second["embedding_store"]["misses"] == 0
    assert second["embedding_store"]["hits"] == 9  # 3 members x (documents, test, train)
    assert first["datasets"][0]["methods"] == second["datasets"][0]["methods"]
    assert len(list((tmp_path / "store").rglob("*.safetensors"))) == 9


def test_embedding_store_ignores_corrupt_file(tmp_path):
    store = EmbeddingStore(tmp_path)
    member = HashMember("a", 8, 0.1)
    texts = ["one", "two"]
    path = store.path_for(member, texts, "query")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    embedding = store.encode(member, texts, "query")
    assert embedding.mean.shape == (2, 8)
    assert store.misses == 1
    assert EmbeddingStore(tmp_path).encode(member, texts, "query").mean.shape == (2, 8)


def test_report_and_plots(data_root, tmp_path):
    members = _members()
    clean = run_evaluation(find_tasks([data_root]), members[:2], store=EmbeddingStore(tmp_path))
    noisy = run_evaluation(find_tasks([data_root]), members, store=EmbeddingStore(tmp_path))
    results = {
        "command": "uec-rag eval --test",
        "runs": {"main": clean, "robustness": noisy},
        "robustness_losses": robustness_losses(clean, noisy),
        "wall_time_s": 1.0,
    }
    text = terminal_report(results)
    report = markdown_report(results, image_dir="img")
    for label in clean["datasets"][0]["methods"]:
        assert label in text
        assert label in report
    losses = results["robustness_losses"]["UEC, direct sum"]["ndcg@10"]
    assert losses["loss"] == pytest.approx(losses["clean"] - losses["with_extra_member"])

    # A document with a title and an abstract is printed on one line.
    example = next(d["example"] for d in clean["datasets"] if d.get("example"))
    example["reranked_top3"][0]["text"] = "A title\n\nThe abstract"
    assert "A title The abstract" in terminal_report(results)

    for plot in (plot_coefficients, plot_reliability):
        path = plot(clean, tmp_path / "img" / f"{plot.__name__}.png")
        assert path is not None
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("UEC_RAG_DATA", str(tmp_path / "env"))
    assert resolve_data_paths(["x"]) == ([Path("x")], "--data")
    assert resolve_data_paths(None) == ([tmp_path / "env"], "$UEC_RAG_DATA")
    monkeypatch.delenv("UEC_RAG_DATA")
    paths, source = resolve_data_paths(None)
    assert source == "the sample corpus"
    assert paths == [find_sample_corpus()]

    monkeypatch.setattr("uec_rag.cli.eval.find_sample_corpus", lambda: None)
    with pytest.raises(FileNotFoundError, match="pass --data PATH"):
        resolve_data_paths(None)


def test_cli_reports_missing_data(tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_main_job_on_sample_corpus(tmp_path, monkeypatch, capsys):
    """The README's main job: real members on the bundled sample corpus."""
    monkeypatch.delenv("UEC_RAG_DATA", raising=False)
    out = tmp_path / "out"
    assert main(["eval", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nDCG@10 on the test split" in printed
    assert "coefficients: minilm" in printed

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    datasets = results["runs"]["main"]["datasets"]
    assert [d["name"] for d in datasets] == ["sample-ar", "sample-en", "sample-ru", "sample-zh"]
    english = datasets[1]["methods"]
    # Every member answers the easy English questions; e5-small is multilingual.
    assert english["e5-small"]["ndcg@10"] >= 0.9
    assert datasets[0]["methods"]["e5-small"]["ndcg@10"] >= 0.9
    assert (out / "img" / "coefficients.png").is_file()
    assert (out / "report.md").is_file()


def test_encode_tasks_fills_store(data_root, tmp_path):
    tasks = find_tasks([data_root])
    members = _members()
    for member in members:
        encode_tasks(tasks, member, store=EmbeddingStore(tmp_path))
    calls = [member.calls for member in members]

    results = run_evaluation(tasks, members, store=EmbeddingStore(tmp_path))
    assert results["embedding_store"]["misses"] == 0
    assert [member.calls for member in members] == calls


@pytest.mark.slow
def test_missing_posterior_fitted_and_cached(tmp_path, monkeypatch):
    from uec_rag.encoders import load_encoder
    from uec_rag.evaluation.runner import fit_missing_posterior

    monkeypatch.setenv("UEC_RAG_CACHE", str(tmp_path / "cache"))
    tasks = find_tasks([SAMPLE])
    member = load_encoder("minilm", posterior=None)
    assert member.posterior.is_prior_only

    fitted = fit_missing_posterior(member, tasks)
    metadata = fitted.posterior.metadata
    assert not fitted.posterior.is_prior_only
    # 4 folders x 4 train pairs; the fit holds out round(16 * 0.2) = 3 of them.
    assert metadata.n_data == 13
    assert "sample-en/qrels/train.tsv (4 pairs)" in metadata.data
    assert "drawn" not in metadata.data
    files = list((tmp_path / "cache" / "posteriors").glob("*.safetensors"))
    assert len(files) == 1

    again = fit_missing_posterior(load_encoder("minilm", posterior=None), tasks)
    torch.testing.assert_close(again.posterior.weight_variance, fitted.posterior.weight_variance)
    assert fit_missing_posterior(fitted, tasks) is fitted


@pytest.mark.slow
def test_missing_posterior_needs_train_pairs(data_root):
    from uec_rag.encoders import load_encoder
    from uec_rag.evaluation.runner import fit_missing_posterior

    with pytest.raises(ValueError, match="offer 8 train pairs; fit one with `uec-rag fit`"):
        fit_missing_posterior(load_encoder("minilm", posterior=None), find_tasks([data_root]))
