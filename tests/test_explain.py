"""jobs.explain (stages/explain.py, scoring/explanations.py, influence/tokens.py, the LM task's
hooks in tasks/lm_prompts.py): per-token contributions are the tokens' gradients along P∇L(z)
and sum to the influence (the LM's and the translation task's token shares sum to their losses);
explaining an eval query gives the score stage's train → test
influence of every training passage; a greedy continuation is the model's argmax; bad input is
one line."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from jax.flatten_util import ravel_pytree

from configs import lm as lm_config
from influence import tokens
from influence.selection import Selection
from runtime.errors import InputError
from scoring import queries
from stages import explain
from tasks import lm, translation
from tasks.gpt import Gpt, GptConfig
from tasks.lm_prompts import Prompts
from tasks.sources import DataError
from tasks.tokenizer import Tokenizer, train_tokenizer
from tasks.transformer import Transformer, TransformerConfig
from tests.pipeline_helpers import results, run_job

CONFIG = "configs/lm.py:runlocal"
TINY = GptConfig(vocab_size=40, emb_dim=8, num_heads=2, num_layers=1, mlp_dim=8, max_len=24)
SHORT = GptConfig(vocab_size=40, emb_dim=8, num_heads=2, num_layers=1, mlp_dim=8, max_len=8)


def _tiny_batch(rng: np.random.Generator) -> dict:
    token_ids = rng.integers(3, SHORT.vocab_size, size=(3, SHORT.max_len)).astype(np.int32)
    token_ids[1, 5:] = 0  # padding
    mask = (token_ids > 0).astype(np.int32)
    mask[2, :3] = 0  # a query: the loss on its last tokens only
    return {"tokens": jnp.asarray(token_ids), "loss_mask": jnp.asarray(mask)}


def test_token_contributions_are_token_gradients_along_v_and_sum_to_the_influence() -> None:
    """c_t(x) = ⟨∇ℓ_t(x), v_j⟩ from one JVP against each token's own gradient (a Jacobian), over
    a selection that leaves some leaves out (their tangent is zero); the rows sum to
    ⟨∇ℓ(x), v_j⟩ of the per-example loss."""
    model = Gpt(SHORT)
    per_example_loss, _ = lm.make_losses(model)
    per_token_loss = lm.make_per_token_loss(model)
    rng = np.random.default_rng(0)
    batch = _tiny_batch(rng)
    params = jax.jit(model.init)(jax.random.key(0), batch["tokens"])["params"]
    selection = Selection.build(params, exclude="position_embedding|block_0/attention/.*")
    selected = selection.select(params)
    flat, unravel = ravel_pytree(selected)
    v = rng.standard_normal((2, flat.size)).astype(np.float32)
    stacked = jax.vmap(unravel)(jnp.asarray(v))
    contributions = jax.jit(tokens.make_token_products(per_token_loss, selection))
    got = np.asarray(contributions(params, stacked, batch))
    assert got.shape == (3, 2, SHORT.max_len)

    loss_of = selection.restrict(per_token_loss, params)
    jac = jax.jit(jax.jacrev(lambda s: loss_of(s, batch)))(selected)  # (3, L, *leaf) per leaf
    jac = np.concatenate(
        [np.asarray(x).reshape(3, SHORT.max_len, -1) for x in jax.tree.leaves(jac)], axis=-1
    )
    want = np.einsum("btp,kp->bkt", jac, v)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert (got[1, :, 5:] == 0).all() and (got[2, :, :3] == 0).all()  # no loss, no share

    example_loss = selection.restrict(per_example_loss, params)
    grads = jax.jit(jax.vmap(lambda x: jax.grad(lambda s: example_loss(s, x)[0])(selected)))(
        jax.tree.map(lambda a: a[:, None], batch)
    )
    flat_grads = np.concatenate([np.asarray(g).reshape(3, -1) for g in jax.tree.leaves(grads)], 1)
    np.testing.assert_allclose(got.sum(-1), flat_grads @ v.T, rtol=1e-4, atol=1e-6)
    both = jax.jit(lambda p, b: (per_token_loss(p, b).sum(1), per_example_loss(p, b)))
    np.testing.assert_allclose(*both(params, batch), rtol=1e-6)


def test_translation_token_shares_sum_to_its_per_example_loss() -> None:
    model = Transformer(
        TransformerConfig(
            vocab_size=20, emb_dim=8, num_heads=2, num_layers=1, qkv_dim=8, mlp_dim=8, max_len=6
        )
    )
    per_example_loss, _ = translation.make_losses(model)
    per_token_loss = translation.make_per_token_loss(model)
    rng = np.random.default_rng(0)
    inputs, targets = (rng.integers(3, 20, size=(2, 6)).astype(np.int32) for _ in range(2))
    targets[1, 4:] = 0
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    params = jax.jit(model.init)(jax.random.key(0), batch["inputs"], batch["targets"])["params"]
    both = jax.jit(lambda p, b: (per_token_loss(p, b), per_example_loss(p, b)))
    shares, losses = both(params, batch)
    np.testing.assert_allclose(np.asarray(shares).sum(1), losses, rtol=1e-6)
    assert (np.asarray(shares)[1, 4:] == 0).all()


def _tiny_model() -> tuple[Gpt, dict]:
    model = Gpt(TINY)
    init = jax.jit(model.init)
    return model, init(jax.random.key(1), jnp.ones((1, TINY.max_len), jnp.int32))["params"]


@pytest.fixture(scope="module")
def prompts() -> Prompts:
    text = [
        "in the beginning god created the heaven and the earth",
        "and the earth was without form and void",
        "and darkness was upon the face of the deep",
    ] * 10
    tokenizer = Tokenizer(train_tokenizer(iter(text), vocab_size=32), TINY.max_len)
    return Prompts(Gpt(TINY), tokenizer)


def test_greedy_query_is_the_argmax_continuation(prompts: Prompts) -> None:
    """The continuation's tokens are the model's argmax one at a time (the prefix re-read), the
    loss is on them only, and they stop at EOS or the context's end."""
    model, params = _tiny_model()
    query = prompts.query_from_text(params, "in the beginning", None, 20)
    token_ids, mask = query["tokens"][0], query["loss_mask"][0].astype(bool)
    start = int(np.flatnonzero(mask)[0])
    logits_of = jax.jit(lambda t: model.apply({"params": params}, t))
    prefix = list(token_ids[:start])
    while len(prefix) < TINY.max_len and (len(prefix) == start or prefix[-1] != 1):
        probe = np.zeros((1, TINY.max_len), np.int32)  # the next position reads a placeholder
        probe[0, : len(prefix) + 1] = [*prefix, 2]
        prefix.append(int(jnp.argmax(logits_of(probe)[0, len(prefix)])))
    assert list(token_ids[mask]) == prefix[start:] and not mask[:start].any()
    assert query["continuation"][0]
    given = prompts.query_from_text(params, "the earth", "god created", 20)
    answer = given["tokens"][0][given["loss_mask"][0].astype(bool)]
    assert prompts._tokenizer.decode(answer[None])[0] == "god created"
    assert given["continuation"][0] == "god created"


@pytest.mark.parametrize(
    ("prompt", "answer", "message"),
    [
        ("  ", None, "the prompt is empty"),
        ("earth " * 24, None, r"the prompt is \d+ tokens; the model's context is data.max_len=24"),
        ("earth " * 5, "heaven " * 5, r"prompt and its answer are \d+ tokens"),
        ("earth", "", "the answer to explain for the prompt 'earth' is empty"),
    ],
)
def test_unusable_prompts_are_data_errors(prompts: Prompts, prompt, answer, message) -> None:
    _, params = _tiny_model()
    with pytest.raises(DataError, match=message):
        prompts.query_from_text(params, prompt, answer, 4)


def test_request_reads_flags_and_a_prompts_file(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("first prompt\n\nsecond prompt\tits answer\n", "utf-8")
    got = explain.request(["a", "b"], str(file), ["x", "y"], 8, 3)
    assert got.prompts == ("a", "b", "first prompt", "second prompt")
    assert got.answers == ("x", "y", None, "its answer")
    for args, message in [
        ((["a"], "", ["x", "y"], 8, 3), "--answer was given 2 times for 1 --prompt"),
        (([], "", [], 8, 3), "nothing to explain"),
        ((["a"], str(tmp_path / "none"), [], 8, 3), "no such file"),
        ((["a"], "", [], 0, 3), "--steps=0"),
    ]:
        with pytest.raises(InputError, match=message):
            explain.request(*args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runlocal LM pipeline (train, fit arnoldi, score with the facts' queries traced)."""
    workdir = tmp_path_factory.mktemp("explain")
    result = run_job("pipeline", workdir, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_explaining_an_eval_query_gives_the_score_stages_influences(trained: Path) -> None:
    """The first eval example (a fact's prompt and answer) as --prompt/--answer, every training
    passage kept (top_k = the split), on 2 devices: each passage's influence equals the score
    stage's train → test influence for that query (1 device), its tokens' scores sum to it; a
    second, greedy prompt is explained in the same pass."""
    config = lm_config.get_config("runlocal")
    fact = lm.build_corpus(config.data, config.seed).facts[0]
    num_train = config.data.num_train
    result = run_job(
        "explain",
        trained,
        f"--prompts={_prompts_file(trained, fact)}",
        f"--top_k={num_train}",
        "--num_cpu_devices=2",
        config=CONFIG,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = results(trained) / "explain"
    table = pd.read_parquet(out / "explanations.parquet")
    want = _score_influences(trained, num_queries=1)
    for kind in ("proponent", "opponent"):
        rows = table[(table.prompt_index == 0) & (table.kind == kind)]
        assert len(rows) == num_train and (rows["rank"] == np.arange(num_train)).all()
        got = rows.set_index("train_id").influence.loc[want.index]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert (np.diff(rows.influence) <= 0).all() if kind == "proponent" else True
    assert set(table.continuation[table.prompt_index == 0]) == {fact.object}
    scores = pd.read_parquet(out / "tokens.parquet")
    sums = scores.groupby(["prompt_index", "train_id"]).score.sum()
    influence = table.drop_duplicates(["prompt_index", "train_id"]).set_index(
        ["prompt_index", "train_id"]
    )
    np.testing.assert_allclose(sums.loc[influence.index], influence.influence, atol=1e-5)
    text = (out / "explain.md").read_text("utf-8")
    assert text.startswith("# Explanations") and text in result.stdout
    assert "## Prompt 1: And God said" in text and "**" in text


def _prompts_file(workdir: Path, fact) -> Path:
    file = workdir / "prompts.txt"
    file.write_text(f"{fact.prompt}\t{fact.object}\nAnd God said\n", "utf-8")
    return file


def _score_influences(workdir: Path, num_queries: int) -> pd.Series:
    """The first query's influence on every training example, from the score parts."""
    scores = results(workdir) / "scores"
    meta = json.loads((scores / "meta.json").read_text())
    _, _, blocks = queries.influences(
        scores, np.asarray(meta["eigvals"], np.float32), num_queries, meta["tail_sigma"]
    )
    parts = list(blocks)
    ids = np.concatenate([part.column("id").to_numpy() for part, _, _ in parts])
    return pd.Series(np.concatenate([v[:, 0, 0] for _, _, v in parts]), index=ids)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--prompt=",), r"^error: the prompt is empty"),
        (("--prompt=" + "word " * 80,), r"the prompt is \d+ tokens; the model's context is data"),
        (
            ("--prompt=And God said", "--config.method.name=randproj"),
            r"no fit of randproj in .*; run `python -m jobs.fit`",
        ),
    ],
)
def test_bad_input_is_one_line(trained: Path, flags, message) -> None:
    result = run_job("explain", trained, *flags, config=CONFIG)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(message, last), last
