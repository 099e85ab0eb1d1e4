"""Fitting driver, pairs loading, posterior files and the ``uec-rag fit`` command."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from uec_rag.cli import main
from uec_rag.coefficients import CoefficientRule, compute_coefficients
from uec_rag.datasets import DataFormatError, gather_pairs, load_beir, load_pairs
from uec_rag.laplace.fit import _make_batches, fit_posterior
from uec_rag.laplace.marglik import log_marginal_likelihood
from uec_rag.laplace.posterior import DiagonalPosterior, PosteriorMismatchError
from uec_rag.similarity import uncertainty_similarity

# ------------------------------------------------------------------ pairs input


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_pairs_jsonl(tmp_path):
    path = _write_lines(
        tmp_path / "pairs.jsonl",
        [
            json.dumps({"query": "q1", "positive": "p1"}),
            "",
            json.dumps({"query": "q2", "positive": "p2", "source": "extra keys are ignored"}),
        ],
    )
    assert load_pairs(path) == [("q1", "p1"), ("q2", "p2")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "positive": ', "invalid JSON at column 28: Expecting value"),
        ('{"query": "q\tx", "positive": "p"}', "at column 13: Invalid control character$"),
        ('{"query": "q"}', "missing field 'positive'"),
        ('{"query": 3, "positive": "p"}', "field 'query' must be a string"),
        ('{"query": "  ", "positive": "p"}', "field 'query' is empty"),
        ('["q", "p"]', "expected a JSON object"),
    ],
)
def test_load_pairs_names_file_and_line(tmp_path, line, message):
    path = _write_lines(
        tmp_path / "pairs.jsonl", [json.dumps({"query": "q", "positive": "p"}), line]
    )
    with pytest.raises(DataFormatError, match=message) as error:
        load_pairs(path)
    assert error.value.line == 2
    assert str(path) in str(error.value)
    assert "line 2" in str(error.value)


def test_load_pairs_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="BEIR folder or a JSONL file"):
        load_pairs(tmp_path / "absent.jsonl")


def test_load_pairs_empty_file(tmp_path):
    path = _write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataFormatError, match="contains no pairs") as error:
        load_pairs(path)
    assert str(error.value) == f"{path}: the file contains no pairs"


def test_load_pairs_beir_train_split(data_dir):
    pairs = load_pairs(data_dir / "scifact")
    dataset = load_beir(data_dir / "scifact", split="train")
    expected = sum(
        1 for judged in dataset.qrels.values() for relevance in judged.values() if relevance > 0
    )
    assert len(pairs) == expected
    query_id = next(iter(dataset.qrels))
    doc_id = next(iter(dataset.qrels[query_id]))
    assert pairs[0] == (dataset.queries[query_id], dataset.corpus[doc_id])


def test_load_pairs_default_split_is_train(data_dir):
    train = {query for query, _ in load_pairs(data_dir / "xquad-en")}
    test = {query for query, _ in load_pairs(data_dir / "xquad-en", split="test")}
    assert len(train) == 230
    assert not train & test


def test_gather_pairs_describes_sources_and_draw(tmp_path):
    lines = [json.dumps({"query": f"q{i}", "positive": f"p{i}"}) for i in range(6)]
    first = _write_lines(tmp_path / "a.jsonl", lines[:4])
    second = _write_lines(tmp_path / "b.jsonl", lines[4:])

    pairs, description = gather_pairs([first, second])
    assert pairs == [(f"q{i}", f"p{i}") for i in range(6)]
    assert description == "a.jsonl (4 pairs), b.jsonl (2 pairs)"

    drawn, description = gather_pairs([first, second], max_pairs=3, seed=5)
    assert drawn == random.Random(5).sample(pairs, 3)
    assert description == "a.jsonl (4 pairs), b.jsonl (2 pairs); 3 drawn with seed 5"

    # Asking for more pairs than there are keeps all of them and mentions no draw.
    assert gather_pairs([first], max_pairs=10) == (pairs[:4], "a.jsonl (4 pairs)")


def test_batches_mask_duplicates_and_other_positives():
    pairs = [("q1", "a"), ("q2", "a"), ("q1", "b"), ("q3", "c")]
    positives = {"q1": {"a", "b"}, "q2": {"a"}, "q3": {"c"}}
    (batch,) = _make_batches(pairs, 4, positives)
    assert batch.passages == ["a", "b", "c"]
    assert batch.targets.tolist() == [0, 0, 1, 2]
    assert batch.mask.tolist() == [
        [True, False, True],
        [True, True, True],
        [False, True, True],
        [True, True, True],
    ]


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        fit_posterior(object(), [("q", "p")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        fit_posterior(object(), [("q", "p"), ("q", 3)])  # type: ignore[arg-type, list-item]
    with pytest.raises(ValueError, match="batch_size"):
        fit_posterior(object(), [("q", "p")] * 3, batch_size=1)  # type: ignore[arg-type]


# ------------------------------------------------------------ real MiniLM fit


@pytest.fixture(scope="module")
def minilm():
    from uec_rag.encoders import load_encoder

    return load_encoder("minilm", posterior=None)


@pytest.fixture(scope="module")
def minilm_fit_pairs(data_dir):
    return random.Random(0).sample(load_pairs(data_dir / "xquad-en"), 40)


@pytest.fixture(scope="module")
def minilm_fit(minilm, minilm_fit_pairs):
    return fit_posterior(
        minilm, minilm_fit_pairs, batch_size=8, held_out_fraction=0.2, show_progress=False
    )


@pytest.mark.slow
def test_fit_prior_precision_beats_neighbours(minilm, minilm_fit):
    layer = minilm.layer
    parameters = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()]).double()
    best = float(
        log_marginal_likelihood(
            -minilm_fit.nll, minilm_fit.curvature, parameters, minilm_fit.prior_precision
        )
    )
    assert best == pytest.approx(minilm_fit.log_marginal_likelihood, rel=1e-9)
    for factor in (0.5, 2.0):
        neighbour = float(
            log_marginal_likelihood(
                -minilm_fit.nll,
                minilm_fit.curvature,
                parameters,
                minilm_fit.prior_precision * factor,
            )
        )
        assert best > neighbour


@pytest.mark.slow
def test_fit_metadata(minilm, minilm_fit):
    metadata = minilm_fit.posterior.metadata
    assert metadata.model_fingerprint == minilm.model_fingerprint()
    assert metadata.layer_name == minilm.layer_name == "encoder.layer.5.output.dense"
    assert metadata.curvature == "diag_ggn"
    assert metadata.temperature == 0.05
    assert metadata.n_data == minilm_fit.n_fit == 32
    assert metadata.prior_precision == minilm_fit.prior_precision
    assert metadata.variance_scale == minilm_fit.variance_scale
    assert metadata.reference_trace == pytest.approx(minilm_fit.reference_trace)
    precision = 1.0 / minilm_fit.posterior.weight_variance.double()
    curvature = minilm_fit.curvature[: minilm.layer.weight.numel()].view_as(precision)
    torch.testing.assert_close(
        precision, curvature + minilm_fit.prior_precision, rtol=1e-5, atol=0.0
    )


@pytest.mark.slow
def test_scale_matches_held_out_distance(minilm, minilm_fit, minilm_fit_pairs):
    # The fit holds out the first 20 % of the seeded shuffle (8 of 40 pairs).
    items = list(minilm_fit_pairs)
    random.Random(0).shuffle(items)
    held_out = items[:8]
    unscaled = minilm.with_posterior(minilm_fit.posterior.with_metadata(variance_scale=1.0))
    queries = unscaled.encode([query for query, _ in held_out], "query", show_progress=False)
    passages = unscaled.encode(
        [passage for _, passage in held_out], "document", show_progress=False
    )
    squared_error = float(((queries.mean - passages.mean).astype(np.float64) ** 2).sum())
    trace = float(queries.variance.astype(np.float64).sum() + passages.variance.sum())
    assert minilm_fit.variance_scale == pytest.approx(squared_error / trace, rel=1e-4)
    assert minilm_fit.n_held_out == 8

    # The reference trace is the median scaled trace over the distinct held-out texts.
    distinct_queries = sorted({query for query, _ in held_out})
    distinct_passages = sorted({passage for _, passage in held_out})
    traces = np.concatenate(
        [
            unscaled.encode(distinct_queries, "query").variance.astype(np.float64).sum(axis=1),
            unscaled.encode(distinct_passages).variance.astype(np.float64).sum(axis=1),
        ]
    )
    expected = minilm_fit.variance_scale * float(np.median(traces))
    assert minilm_fit.reference_trace == pytest.approx(expected, rel=1e-4)


_DRIVER_PAIRS = [
    ("Who wrote it?", "The novel was written by a retired ship's doctor in 1911."),
    ("When was the bridge opened?", "The bridge opened to traffic in May 1937 after four years."),
    ("Who wrote it?", "A second edition, revised by the author's daughter, followed."),
    ("What is the capital?", "Canberra"),
    (
        "How tall is the tower and what is it made of?",
        "The bridge opened to traffic in May 1937 after four years.",
    ),
    ("Why?", "Because the river flooded every spring, the town moved uphill."),
]


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_driver_curvature_matches_autograd_on_minilm(minilm, curvature, monkeypatch):
    """Windowed, length-sorted captures give the curvature of plain padded batches.

    The reference differentiates the masked logits of each batch, computed from one
    padded capture of its queries and one of its passages, with full autograd, and
    applies the GGN or empirical Fisher formula to the explicit Jacobian.
    """
    from uec_rag.laplace import fit as fit_module

    positives: dict[str, set[str]] = {}
    for query, passage in _DRIVER_PAIRS:
        positives.setdefault(query, set()).add(passage)
    batches = _make_batches(_DRIVER_PAIRS, 3, positives)
    assert not bool(batches[0].mask.all())  # a second positive is masked out
    monkeypatch.setattr(fit_module, "CAPTURE_WINDOW", 6)  # both batches share one window
    monkeypatch.setattr(fit_module, "CAPTURE_BATCH_SIZE", 2)
    ours, nll = fit_module._accumulate_curvature(minilm, batches, 0.05, curvature, False)

    weight, bias = minilm.layer.weight.detach(), minilm.layer.bias.detach()
    expected = torch.zeros_like(ours)
    expected_nll = 0.0
    for batch in batches:
        query_capture = minilm.capture(batch.queries, "query")
        passage_capture = minilm.capture(batch.passages, "document")

        def logits(w, b, query_capture=query_capture, passage_capture=passage_capture, batch=batch):
            queries = minilm.embed_from_capture(query_capture, w, b)
            passages = minilm.embed_from_capture(passage_capture, w, b)
            return (queries @ passages.T / 0.05).masked_fill(~batch.mask, float("-inf"))

        jacobian_weight, jacobian_bias = torch.autograd.functional.jacobian(logits, (weight, bias))
        jacobian = torch.cat([jacobian_weight.flatten(2), jacobian_bias], dim=2).double()
        probs = torch.softmax(logits(weight, bias).double(), dim=1)
        for row, target in enumerate(batch.targets.tolist()):
            p = probs[row]
            expected_nll -= float(torch.log(p[target]))
            if curvature == "ggn":
                hessian = torch.diag(p) - torch.outer(p, p)
                expected += torch.einsum("up,uv,vp->p", jacobian[row], hessian, jacobian[row])
            else:
                residual = p.clone()
                residual[target] -= 1.0
                expected += (residual @ jacobian[row]) ** 2

    assert nll == pytest.approx(expected_nll, rel=1e-4)
    scale = float(expected.max())
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-5 * scale)
    assert float((ours - expected).abs().sum() / expected.abs().sum()) < 1e-4


@pytest.mark.slow
def test_posterior_file_round_trip(minilm, minilm_fit, tmp_path):
    from uec_rag.encoders import load_encoder

    path = minilm_fit.posterior.save(tmp_path / "minilm.safetensors")
    loaded = DiagonalPosterior.load(path)
    torch.testing.assert_close(loaded.weight_variance, minilm_fit.posterior.weight_variance)
    torch.testing.assert_close(loaded.bias_variance, minilm_fit.posterior.bias_variance)
    assert loaded.metadata == minilm_fit.posterior.metadata

    texts = ["Where is the Eiffel Tower?", "Где находится Эйфелева башня?"]
    expected = minilm.with_posterior(minilm_fit.posterior).encode(texts, "query")
    reloaded = load_encoder("minilm", posterior=path).encode(texts, "query")
    np.testing.assert_array_equal(reloaded.variance, expected.variance)


@pytest.mark.slow
def test_posterior_rejected_on_other_model(minilm_fit, tmp_path):
    from uec_rag.encoders import load_encoder

    path = minilm_fit.posterior.save(tmp_path / "minilm.safetensors")
    with pytest.raises(PosteriorMismatchError, match="does not belong to this model"):
        load_encoder("e5-small", posterior=path).encode(["a query"], "query")


@pytest.mark.slow
def test_float16_file_keeps_ranking_and_coefficients(minilm, minilm_fit, data_dir, tmp_path):
    dataset = load_beir(data_dir / "xquad-en", split="test")
    query_ids = sorted(dataset.queries)[:60]
    queries = [dataset.queries[query_id] for query_id in query_ids]
    documents = list(dataset.corpus.values())

    full = minilm_fit.posterior.save(tmp_path / "fp32.safetensors")
    half = minilm_fit.posterior.save(tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    prior_only = minilm.with_posterior(None)
    results = []
    for path in (full, half):
        member = minilm.with_posterior(path)
        query_gaussians = member.encode(queries, "query")
        scores = uncertainty_similarity(query_gaussians, member.encode(documents)).score
        top10 = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        traces = np.stack(
            [
                query_gaussians.variance.sum(axis=1),
                prior_only.encode(queries, "query").variance.sum(axis=1),
            ],
            axis=1,
        )
        coefficients = compute_coefficients(traces, CoefficientRule())
        results.append((top10, coefficients))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_fit_writes_posterior(data_dir, tmp_path, capsys):
    pairs = load_pairs(data_dir / "xquad-ru")[:12]
    data = _write_lines(
        tmp_path / "pairs.jsonl",
        [json.dumps({"query": query, "positive": passage}) for query, passage in pairs],
    )
    out = tmp_path / "fitted.safetensors"
    arguments = ["fit", "--model", "minilm", "--data", str(data), "--out", str(out)]
    arguments += ["--curvature", "ef", "--batch-size", "4", "--held-out", "0.25"]
    status = main([*arguments, "--dtype", "float16"])
    assert status == 0
    printed = capsys.readouterr().out
    for label in ("prior precision:", "log marginal likelihood:", "variance scale:"):
        assert label in printed
    metadata = DiagonalPosterior.load(out).metadata
    assert metadata.curvature == "empirical_fisher"
    assert metadata.n_data == 9
    assert "pairs.jsonl (12 pairs)" in metadata.data


def test_cli_fit_reports_bad_line(tmp_path, capsys):
    data = _write_lines(
        tmp_path / "pairs.jsonl", [json.dumps({"query": "q", "positive": "p"}), "{bad"]
    )
    status = main(["fit", "--model", "minilm", "--data", str(data), "--out", str(tmp_path / "x")])
    assert status == 2
    assert f"{data}, line 2: invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "1"], "error: --batch-size must be >= 2 (in-batch negatives), got 1"),
        (["--held-out", "1.5"], "error: --held-out must be in [0, 1), got 1.5"),
        (["--temperature", "0"], "error: --temperature must be finite and > 0, got 0.0"),
        (["--model", "minilmx"], "error: --model minilmx: unknown model 'minilmx'"),
        (["--model", "{folder}"], "has no config.json"),
    ],
)
def test_cli_fit_names_bad_option(tmp_path, capsys, options, message):
    data = _write_lines(
        tmp_path / "pairs.jsonl",
        [json.dumps({"query": f"q{index}", "positive": f"p{index}"}) for index in range(4)],
    )
    arguments = ["fit", "--model", "minilm", "--data", str(data), "--out", str(tmp_path / "x")]
    status = main(arguments + [option.format(folder=tmp_path) for option in options])
    assert status == 2
    assert message in capsys.readouterr().err
