"""The language-model task (tasks/lm.py, tasks/gpt.py, tasks/facts.py) and fact tracing
(scoring/retrieval.py): planted facts are where they are said to be, each query's loss covers its
answer only, the streamed retrieval metrics equal the ones computed from every score at once, and
bad input is one line."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from jax.flatten_util import ravel_pytree

from configs import lm as lm_config
from influence import metrics
from influence.hvp import make_hvp, make_mean_loss
from scoring import queries
from tasks import facts, lm
from tasks.gpt import Gpt, GptConfig
from tasks.sources import DataError
from tests.pipeline_helpers import results, run_job, run_module

CONFIG = "configs/lm.py:runlocal"


def test_ranked_retrieval_equals_the_metrics_over_all_scores() -> None:
    """recall@10, MRR and AUC from the streamed counts against ranks and ``roc_auc`` computed
    over every score at once; with ties, against the ranks of 2,000 random tie-breaks."""
    rng = np.random.default_rng(0)
    for trial in range(12):
        scores = np.round(rng.standard_normal(60), 0 if trial % 2 else 6)  # odd trials: ties
        relevant = np.zeros(60, bool)
        relevant[rng.choice(60, size=int(rng.integers(1, 14)), replace=False)] = True
        s, others = scores[relevant], scores[~relevant]
        above = (others[None] > s[:, None]).sum(1)
        ties = (others[None] == s[:, None]).sum(1)
        got = metrics.ranked_retrieval(s, above, ties, int((~relevant).sum()), k=10)
        # Ranks under random tie-breaks (a random second key); no ties: the one ranking.
        keys = rng.random((2000 if trial % 2 else 1, 60))
        order = np.lexsort((keys, -np.broadcast_to(scores, keys.shape)), axis=-1)
        ranks = np.argsort(order, axis=-1)[:, relevant] + 1  # (tie-breaks, relevant)
        tolerance = 0.02 if trial % 2 else 1e-12
        assert got["recall_at_10"] == pytest.approx(np.mean(ranks <= 10), abs=tolerance)
        assert got["mrr"] == pytest.approx(1.0 / ranks.min(axis=1).mean(), rel=tolerance)
        assert got["auc"] == pytest.approx(metrics.roc_auc(relevant, scores))


def test_facts_are_invented_and_planted_in_distinct_wordings() -> None:
    corpus_words = {"abel", "zion"}
    invented = facts.invent(8, seed=0, corpus_words=corpus_words)
    names = [w.lower() for f in invented for w in (*f.subject.split(), f.object)]
    assert len(set(names)) == len(names) and not set(names) & corpus_words
    passages = [[f"verse {i}a.", f"verse {i}b."] for i in range(40)]
    texts, fact = facts.plant(passages, invented, copies=3, seed=1)
    for k, f in enumerate(invented):
        planted = [texts[i] for i in np.flatnonzero(fact == k)]
        assert len(planted) == 3
        statements = {f.statement(c) for c in range(3)}
        assert len(statements) == 3 and all(any(s in t for s in statements) for t in planted)
        assert len({next(s for s in statements if s in t) for t in planted}) == 3
        assert not any(f.prompt in t for t in texts)  # the query is a paraphrase
    assert all(texts[i] == " ".join(passages[i]) for i in np.flatnonzero(fact < 0))
    with pytest.raises(ValueError, match="need as many passages"):
        facts.plant(passages[:5], invented, copies=3, seed=1)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory):
    return lm.get_task(lm_config.get_config("runlocal"), tmp_path_factory.mktemp("lm_task"))


def test_queries_have_their_loss_on_the_answer_only(task) -> None:
    """The first eval rows are the facts' queries: the masked tokens decode to the object's name,
    the unmasked ones to the prompt; a passage's loss covers all its tokens."""
    config = lm_config.get_config("runlocal")
    evaluation = task.splits["eval"]
    rows = evaluation.take(np.arange(config.data.num_facts + 2))
    tokenizer = task.splits["train"].tokenizer
    for i in range(config.data.num_facts):
        tokens, mask = rows["tokens"][i], rows["loss_mask"][i].astype(bool)
        assert mask.any() and not mask[0]
        assert tokenizer.decode(tokens[mask][None])[0] == rows["answer"][i]
        assert rows["text"][i].endswith(" " + rows["answer"][i]) and rows["fact"][i] == i
    passage = config.data.num_facts
    assert (rows["loss_mask"][passage] == (rows["tokens"][passage] > 0)).all()
    assert rows["fact"][passage] == -1


def test_planted_and_scrambled_passages(task) -> None:
    train = task.splits["train"]
    rows = train.take(np.arange(train.num_examples))
    config = lm_config.get_config("runlocal")
    counts = np.bincount(rows["fact"][rows["fact"] >= 0])
    assert (counts == config.data.fact_copies).all() and counts.size == config.data.num_facts
    assert not (rows["scrambled"] & (rows["fact"] >= 0)).any()
    assert rows["scrambled"].sum() == round(config.data.scramble_fraction * train.num_examples)
    verses = [" ".join(p) for p in lm.bible_passages("4", 1)]  # runlocal: a verse a passage
    for text, fact, scrambled, id_ in zip(
        rows["text"], rows["fact"], rows["scrambled"], rows["id"], strict=True
    ):
        original = verses[id_]
        if scrambled:  # the passage's own words, in another order
            assert text != original and sorted(text.split()) == sorted(original.split())
        elif fact < 0:
            assert text == original
        else:
            assert original in text and len(text) > len(original)


def test_gpt_hvp_equals_hessian_times_v() -> None:
    """make_hvp of the LM's loss (answer-masked rows among them) against jax.hessian."""
    model = Gpt(GptConfig(vocab_size=8, emb_dim=4, num_heads=1, num_layers=1, mlp_dim=4, max_len=4))
    loss, _ = lm.make_losses(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 8, size=(3, 4)).astype(np.int32)
    tokens[1, 3:] = 0
    mask = (tokens > 0).astype(np.int32)
    mask[2, :2] = 0  # a query: the loss on its last tokens only
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    params = model.init(jax.random.key(0), batch["tokens"])["params"]
    flat, unravel = ravel_pytree(params)
    mean = make_mean_loss(loss, 1e-3)
    hessian = jax.jit(jax.hessian(lambda f: mean(unravel(f), batch)))(flat)
    v = jnp.asarray(rng.standard_normal(flat.size), jnp.float32)
    got = ravel_pytree(jax.jit(make_hvp(loss, 1e-3))(params, batch, unravel(v)))[0]
    want = hessian @ v
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """benchmarks/fact_tracing.py on the runlocal preset with Arnoldi alone: its report runs
    train → fit → score → evaluate with the Ritz tail (both rankings traced); (workdir, what it
    printed)."""
    workdir = tmp_path_factory.mktemp("lm")
    printed = run_module(
        "benchmarks.fact_tracing",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        "--methods=arnoldi",
        "--keep_epochs=1",
    )
    return workdir, printed


@pytest.fixture(scope="module")
def pipeline(benchmark) -> Path:
    """The Arnoldi run of the benchmark's report (its own workdir, the params linked)."""
    top_k = lm_config.get_config("runlocal").distill.top_k
    return benchmark[0] / "report" / f"arnoldi_p{top_k}"


@pytest.mark.slow
def test_benchmark_prints_each_ranking_beside_bm25(benchmark) -> None:
    workdir, printed = benchmark
    rows = [
        line.split(" | ")[0].strip("| ") for line in printed.splitlines() if line.startswith("| ")
    ]
    assert rows[1:] == ["arnoldi", "arnoldi + tail", "BM25 (prompt)", "BM25 (prompt + answer)"]
    summary = json.loads((workdir / "fact_tracing.json").read_text())
    assert all(0.0 <= r["auc"] <= 1.0 for r in summary["rows"])
    assert set(summary["memorisation"]) >= {"query: answered", "wording 0: answer loss"}


@pytest.mark.slow
def test_fact_tracing_metrics_equal_the_full_ranking(pipeline) -> None:
    """query_retrieval.json against the ranking of every training passage by each query's
    influence, read whole, and metrics.json's means of it."""
    out = results(pipeline)
    rows = json.loads((out / "query_retrieval.json").read_text())
    meta = json.loads((out / "scores" / "meta.json").read_text())
    config = lm_config.get_config("runlocal")
    table, names, blocks = queries.influences(
        out / "scores",
        np.asarray(meta["eigvals"], np.float32),
        config.score.num_queries,
        meta["tail_sigma"],
    )
    assert names == ("influence", "influence_tail") and set(rows) == set(names)
    parts = list(blocks)
    fact = np.concatenate([p.column("fact").to_numpy() for p, _, _ in parts])
    values = np.concatenate([v for _, _, v in parts])  # (train rows, queries, names)
    for n, name in enumerate(names):
        assert len(rows[name]) == config.data.num_facts
        for row in rows[name]:
            q = int(np.flatnonzero(table.column("id").to_numpy() == row["query_id"])[0])
            relevant = fact == row["fact"]
            assert relevant.sum() == row["relevant"] == config.data.fact_copies
            assert row["auc"] == pytest.approx(metrics.roc_auc(relevant, values[:, q, n]))
            ranks = 1 + (values[:, q, n][None] > values[relevant, q, n][:, None]).sum(1)
            assert row["mrr"] == pytest.approx(1.0 / ranks.min())
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["query_auc"] == pytest.approx(np.mean([r["auc"] for r in rows["influence"]]))
    assert "query_mrr_tail" in summary


@pytest.mark.slow
def test_trained_model_reports_answered_facts(pipeline) -> None:
    """'answered' is averaged over the queries only (NaN on passages): a fraction, not NaN."""
    meta = json.loads(next((pipeline / "params").glob("*/meta/metadata")).read_text())
    assert 0.0 <= meta["eval_answered"] <= 1.0 and 0.0 < meta["eval_token_accuracy"] < 1.0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_facts": 200}, r"data.num_facts=200 × data.fact_copies=3 planted passages must fit"),
        ({"max_len": 8}, r"a fact query is \d+ tokens, more than data.max_len=8"),
        ({"source": "bible:zz"}, r"no such Bible"),
        ({"source": "novel:x"}, r"neither bible:<name> \(bible:4\) nor text:<path>"),
        ({"scramble_fraction": 1.0}, r"data.scramble_fraction=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_data_fields_are_one_line(fields, message, tmp_path) -> None:
    config = lm_config.get_config("runlocal")
    config.data.update(fields)
    with pytest.raises(DataError, match=message) as raised:
        lm.get_task(config, tmp_path)
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_too_many_facts_stop_the_job_before_training(tmp_path) -> None:
    result = run_job("pipeline", tmp_path, "--config.data.num_facts=200", config=CONFIG)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.num_facts=200 × data.fact_copies=3"), last
    assert not (tmp_path / "params").exists()


def test_scores_record_the_fact_column(task) -> None:
    assert task.output_columns() == ("id", "fact", "scrambled")
    assert task.relevance_column == "fact"
    frame = pd.DataFrame({"fact": task.splits["train"].take(np.arange(8))["fact"]})
    assert frame["fact"].dtype == np.int64
