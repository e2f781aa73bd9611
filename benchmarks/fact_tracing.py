"""Fact tracing on the language model: which training passages taught it each planted fact?
(TrackStar's protocol, Chang et al. 2024: plant facts, query them, rank the training data.)

    .venv/bin/python -m benchmarks.fact_tracing --config=configs/lm.py --workdir=workdirs/lm_facts

Runs ``jobs.report`` on ``--config`` in ``--workdir`` (a process of its own, as a user runs it;
every result is cached there, so a second run only adds what is missing) with the methods of
``--methods`` on one parameter selection, ``--include`` (default: the MLP layers of every block,
as Grosse et al. 2023 restrict EK-FAC to them; every method sees the same parameters), TracIn over
the params kept after the epochs of ``--keep_epochs``, and Arnoldi with the Ritz tail (both its
rankings are measured). Then BM25 (``bm25s``, Lucene's variant; English stopwords) ranks the same
training passages by the words of each query: the prompt alone (what a user asking has) and the
prompt with the model's answer (what TrackStar gives BM25). Prints one table (recall@10, MRR, AUC
of the planted passages, means over the facts; fit and scoring seconds) and writes
``<workdir>/fact_tracing.json``; the fraction of facts the model answers comes from the train job.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks.configs import load_config

REPO = Path(__file__).resolve().parents[1]
_CONFIG = flags.DEFINE_string("config", "configs/lm.py", "Config file[:presets].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the report runs (reused).")
_METHODS = flags.DEFINE_list("methods", ["graddot", "tracin", "ekfac", "arnoldi"], "Methods.")
_INCLUDE = flags.DEFINE_string("include", ".*/mlp/.*", "params.include of every method.")
_KEEP = flags.DEFINE_list("keep_epochs", ["2", "4", "6", "8"], "TracIn's checkpoints.")
_FLAGS = flags.DEFINE_multi_string("flag", [], "More --config.* flags for the report.")


def run_report(workdir: Path) -> tuple[dict, float]:
    """``jobs.report`` with the comparison's fields; (report.json, wall seconds)."""
    config = load_config(_CONFIG.value)
    command = [
        sys.executable,
        "-m",
        "jobs.report",
        f"--config={_CONFIG.value}",
        f"--workdir={workdir}",
        f"--config.report.methods=({','.join(repr(m) for m in _METHODS.value)},)",
        f"--config.report.top_ks=({config.distill.top_k},)",
        f"--config.params.include={_INCLUDE.value}",
        f"--config.train.keep_epochs=({','.join(_KEEP.value)},)",
        "--config.distill.tail=ritz",
        *_FLAGS.value,
    ]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((workdir / "report.json").read_text())
    return report, time.perf_counter() - start


def bm25_rows(workdir: Path) -> list[dict]:
    """BM25 over the training passages, queried by the prompt and by prompt + answer."""
    import bm25s

    from influence import metrics
    from tasks import lm

    config = load_config(_CONFIG.value)
    task = lm.get_task(config, workdir)
    train, evaluation = task.splits["train"], task.splits["eval"]
    passages = train.take(np.arange(train.num_examples))
    queries = evaluation.take(np.arange(config.data.num_facts))
    start = time.perf_counter()
    retriever = bm25s.BM25()
    corpus = bm25s.tokenize(list(passages["text"]), stopwords="en", show_progress=False)
    retriever.index(corpus, show_progress=False)
    fit_s = time.perf_counter() - start
    rows = []
    for name, texts in (
        ("prompt", [str(t)[: -len(str(a)) - 1] for t, a in zip(queries["text"], queries["answer"], strict=True)]),
        ("prompt + answer", [str(t) for t in queries["text"]]),
    ):  # fmt: skip
        start = time.perf_counter()
        per_query = []
        for k, text in enumerate(texts):
            words = bm25s.tokenize([text], stopwords="en", show_progress=False, return_ids=False)
            scores = retriever.get_scores(words[0])
            relevant = passages["fact"] == queries["fact"][k]
            s, others = scores[relevant], scores[~relevant]
            above = (others[None] > s[:, None]).sum(1)
            ties = (others[None] == s[:, None]).sum(1)
            per_query.append(metrics.ranked_retrieval(s, above, ties, int((~relevant).sum())))
        rows.append(
            {
                "method": f"BM25 ({name})",
                "fit_s": fit_s,
                "score_s": time.perf_counter() - start,
                **{k: float(np.mean([q[k] for q in per_query])) for k in per_query[0]},
            }
        )
    return rows


def memorisation(workdir: Path) -> dict[str, float]:
    """How far the trained model learnt the facts: the fraction it answers (greedy decoding from
    the prefix says the object) and the answer's mean token loss, after the paraphrased query and
    after the prefix of each wording trained on, and the loss of another fact's object after the
    query (what an unlearnt answer costs)."""
    import jax.numpy as jnp

    from stages import checks, setup
    from stages.artifacts import restore_params
    from tasks import lm

    config = load_config(_CONFIG.value)
    params, ctx = restore_params(setup.context(config, workdir, checks.check_train))
    tokenizer = ctx.split("train").tokenizer
    facts = lm.build_corpus(config.data, config.seed).facts
    wrong = [facts[(i + 1) % len(facts)].object for i in range(len(facts))]
    cases = {"query": ([f.prompt for f in facts], [f.object for f in facts])}
    for w in range(3):
        prefixes = [f.statement(w).split(f.object)[0].rstrip() for f in facts]
        cases[f"wording {w}"] = (prefixes, [f.object for f in facts])
    cases["query, another fact's object"] = ([f.prompt for f in facts], wrong)
    out = {}
    for name, (prefixes, answers) in cases.items():
        tokens = np.zeros((len(facts), config.data.max_len), np.int32)
        mask = np.zeros_like(tokens)
        pairs = zip(tokenizer.ids(prefixes), tokenizer.ids(answers), strict=True)
        for i, (p, a) in enumerate(pairs):
            tokens[i, : len(p) + len(a)], mask[i, len(p) : len(p) + len(a)] = p + a, 1
        batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
        out[f"{name}: answered"] = float(np.mean(ctx.task.metrics(params, batch)["answered"]))
        out[f"{name}: answer loss"] = float(np.mean(ctx.task.per_example_loss(params, batch)))
    return out


def influence_rows(report: dict) -> list[dict]:
    rows = []
    for r in report["rows"]:
        for suffix, ranking in (("", ""), ("_tail", " + tail")):
            if f"query_auc{suffix}" in r:
                rows.append(
                    {
                        "method": f"{r['method']}{ranking}",
                        "top_k": r["top_k"] if r["swept"] else None,
                        "fit_s": r["fit_s"],
                        "score_s": r["score_s"],
                        **{k: r[f"query_{k}{suffix}"] for k in ("recall_at_10", "mrr", "auc")},
                    }
                )
    return rows


def main(argv: list[str]) -> None:
    del argv
    workdir = Path(_WORKDIR.value).resolve()
    report, seconds = run_report(workdir)
    rows = influence_rows(report) + bm25_rows(workdir)
    meta = json.loads(next((workdir / "params").glob("*/meta/metadata")).read_text())
    learnt = memorisation(workdir)
    summary = {
        "config": _CONFIG.value,
        "include": _INCLUDE.value,
        "num_params": report["num_params"],
        "num_train": report["num_train"],
        "answered": meta.get("eval_answered"),
        "eval_loss": meta.get("eval_loss"),
        "train_loss": meta.get("train_loss"),
        "report_wall_s": seconds,
        "notes": report["notes"],
        "memorisation": learnt,
        "rows": rows,
    }
    (workdir / "fact_tracing.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{report['num_train']} training passages, {report['num_params']:,} params selected "
        f"({_INCLUDE.value}); the model answers {100 * (meta.get('eval_answered') or 0):.0f}% "
        "of the facts"
    )
    print("| method | p̃ | fit s | score s | recall@10 | MRR | AUC |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        top_k = r.get("top_k") or "–"
        print(
            f"| {r['method']} | {top_k} | {r['fit_s']:.1f} | {r['score_s']:.1f} | "
            f"{r['recall_at_10']:.3f} | {r['mrr']:.3f} | {r['auc']:.3f} |"
        )
    for note in report["notes"]:
        print(f"- {note}")
    for name, value in learnt.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
