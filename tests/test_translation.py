"""The translation task (tasks/translation.py, tasks/transformer.py): the Transformer's HVP is the
Hessian's product, its eigenvalues do not depend on the mesh, Arnoldi resumes bitwise, the TFDS
source reads a prepared ArrayRecord translation dataset, and bad input is one line."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence.hvp import make_hvp, make_mean_loss
from runtime import failpoints
from tasks import translation
from tasks.sources import DataError, MappedSource, read_all
from tasks.transformer import Transformer, TransformerConfig
from tests.pipeline_helpers import eigvals, results, run_job, steps

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

CONFIG = "configs/translation.py:runlocal"
ONE_EPOCH = ("--config.train.num_epochs=1",)


def test_transformer_hvp_equals_hessian_times_v() -> None:
    """A 2,000-parameter instance on random token pairs with padding: make_hvp against
    jax.hessian of the mean loss (+ l2) on the flattened params, for random v."""
    config = TransformerConfig(
        vocab_size=24, emb_dim=8, num_heads=2, num_layers=1, qkv_dim=8, mlp_dim=16, max_len=8
    )
    model = Transformer(config)
    loss, _ = translation.make_losses(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 24, size=(2, 6, 8)).astype(np.int32)
    lengths = np.array([[8, 5, 3, 7, 6, 2], [4, 8, 6, 2, 5, 7]])
    tokens[np.arange(8)[None, None] >= lengths[..., None]] = 0  # padding after each sentence
    batch = {"inputs": jnp.asarray(tokens[0]), "targets": jnp.asarray(tokens[1])}
    params = model.init(jax.random.key(0), batch["inputs"], batch["targets"])["params"]
    flat, unravel = ravel_pytree(params)
    l2 = 1e-3
    mean = make_mean_loss(loss, l2)
    hessian = jax.jit(jax.hessian(lambda f: mean(unravel(f), batch)))(flat)
    hvp = jax.jit(make_hvp(loss, l2))
    for seed in range(3):
        v = jnp.asarray(np.random.default_rng(seed).standard_normal(flat.size), jnp.float32)
        got = ravel_pytree(hvp(params, batch, unravel(v)))[0]
        want = hessian @ v
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert flat.size > 1500


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The runlocal preset trained for one epoch (params and tokenizer in the workdir)."""
    workdir = tmp_path_factory.mktemp("translation")
    result = run_job("train", workdir, *ONE_EPOCH, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def with_params(trained, workdir):
    for name in ("params", "tokenizer"):
        shutil.copytree(trained / name, workdir / name)
    return workdir


@pytest.fixture(scope="module")
def one_device(trained, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted 1-device Arnoldi run on the trained params: the reference."""
    workdir = with_params(trained, tmp_path_factory.mktemp("one_device"))
    assert run_job("arnoldi", workdir, *ONE_EPOCH, config=CONFIG).returncode == 0
    return workdir


def test_eigenvalues_do_not_depend_on_the_mesh(trained, one_device, tmp_path) -> None:
    """8 fake devices with the large leaves, Krylov basis and eigenvectors split over a 'model'
    axis of 8 give the 1-device eigenvalues."""
    eight = with_params(trained, tmp_path / "eight")
    flags = (
        "--num_cpu_devices=8",
        "--config.mesh.data=1",
        "--config.mesh.model=8",
        "--config.mesh.min_shard_size=128",
    )
    result = run_job("arnoldi", eight, *ONE_EPOCH, *flags, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'model': 8" in result.stderr
    np.testing.assert_allclose(eigvals(eight), eigvals(one_device), rtol=1e-5)


def test_arnoldi_resumes_after_sigkill_identically(trained, one_device, tmp_path) -> None:
    workdir = with_params(trained, tmp_path / "killed")
    killed = run_job(
        "arnoldi",
        workdir,
        *ONE_EPOCH,
        config=CONFIG,
        env={failpoints.ENV: "arnoldi_iteration=10"},
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert steps(results(workdir) / "krylov") and not steps(results(workdir) / "fitted")
    resumed = run_job("arnoldi", workdir, *ONE_EPOCH, config=CONFIG)
    assert resumed.returncode == 0 and "resuming Arnoldi at iteration" in resumed.stderr
    np.testing.assert_array_equal(eigvals(workdir), eigvals(one_device))


def test_tokenizer_from_another_config_is_refused(trained, tmp_path) -> None:
    workdir = with_params(trained, tmp_path / "other")
    before = (workdir / "tokenizer" / "spm.model").read_bytes()
    result = run_job("arnoldi", workdir, *ONE_EPOCH, "--config.data.vocab_size=300", config=CONFIG)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "the tokenizer in" in last and "data.vocab_size=512" in last, last
    assert (workdir / "tokenizer" / "spm.model").read_bytes() == before
    assert not (results(workdir) / "krylov").exists()


@pytest.fixture(scope="module")
def tfds_pairs(tmp_path_factory: pytest.TempPathFactory):
    """200 Bible pairs as a local TFDS translation dataset in ArrayRecord format, with the
    features of wmt17_translate/de-en ('de', 'en' text), as a user would prepare WMT offline."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    bible = read_all(translation.open_bible("e", "4"))
    pairs = {"de": bible["source"][:200].astype(str), "en": bible["target"][:200].astype(str)}
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="wmt_tiny",
        version="1.0.0",
        features=tfds.features.Translation(languages=("de", "en")),
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(pairs)},
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        file_format="array_record",
        disable_shuffling=True,
    )
    return str(builder.data_dir), pairs


def test_tfds_translation_source_reads_pairs_by_position(tfds_pairs) -> None:
    builder_dir, pairs = tfds_pairs
    source = translation.TfdsPairs(builder_dir, "train", "de", "en")
    assert source.num_examples == 200
    got = source.take(np.array([5, 0, 199]))
    assert list(got["source"]) == [pairs["de"][i] for i in (5, 0, 199)]
    assert list(got["target"]) == [pairs["en"][i] for i in (5, 0, 199)]
    with pytest.raises(DataError, match=r"has features \['de', 'en'\], not the .*'fr'"):
        translation.TfdsPairs(builder_dir, "train", "fr", "en")


def test_tfds_run_with_truncation_logged(tfds_pairs, tmp_path) -> None:
    """The train job on the TFDS dataset: pairs longer than data.max_len are cut, counted in the
    log, and training proceeds."""
    builder_dir, _ = tfds_pairs
    flags = (
        f"--config.data.source=tfds:{builder_dir}",
        "--config.data.num_train=160",
        "--config.data.num_eval=32",
        "--config.data.vocab_size=200",
        "--config.data.max_len=16",
        *ONE_EPOCH,
    )
    result = run_job("train", tmp_path, *flags, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "longer than data.max_len=16 tokens and truncated" in result.stderr
    assert (tmp_path / "params").exists()


def test_greedy_decoding_is_the_argmax_of_its_own_teacher_forcing() -> None:
    """Each decoded token is the argmax of the logits the training-time (teacher-forced) model
    gives at its position after the decoded prefix; after the first EOS only padding follows."""
    config = TransformerConfig(
        vocab_size=20, emb_dim=16, num_heads=2, num_layers=2, qkv_dim=16, mlp_dim=16, max_len=10
    )
    model = Transformer(config)
    inputs = jnp.asarray(np.random.default_rng(1).integers(3, 20, size=(6, 10)), jnp.int32)
    params = model.init(jax.random.key(3), inputs, inputs)["params"]
    decoded = np.asarray(
        jax.jit(translation.greedy_translate, static_argnums=(0, 3))(model, params, inputs, 10)
    )
    logits = np.asarray(model.apply({"params": params}, inputs, jnp.asarray(decoded)))
    for row, out in zip(logits, decoded, strict=True):
        end = list(out).index(translation.EOS) + 1 if translation.EOS in out else len(out)
        np.testing.assert_array_equal(out[:end], row[:end].argmax(-1))
        assert (out[end:] == translation.PAD).all()
    assert (decoded[:, 0] > 0).all()


def test_bleu_is_sacrebleu_corpus_bleu() -> None:
    import sacrebleu

    refs = ["And God said: Let there be light.", "And there was light."]
    hyps = ["And God said: let there be light!", "There was light."]
    assert translation.bleu(refs, refs) == pytest.approx(100.0)
    assert translation.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0.0 < translation.bleu(hyps, refs) < 100.0


def test_tokenizer_round_trip_with_eos_padding_and_truncation() -> None:
    """encode → decode gives the text back (up to the first EOS, padding dropped); a sentence longer than
    max_len keeps EOS as its last token and is counted."""
    bible = read_all(translation.open_bible("e", "4"))
    pairs = zip(bible["source"][:300], bible["target"][:300], strict=True)
    text = [str(s) for pair in pairs for s in pair]
    tokenizer = translation.Tokenizer(translation.train_tokenizer(iter(text), 300), max_len=128)
    sentences = np.array(["Und Gott sprach: Es werde Licht!", "And there was light."], object)
    ids = tokenizer.encode(sentences)
    assert ids.shape == (2, 128) and (ids[:, -1] == translation.PAD).all()
    assert tokenizer.decode(ids) == list(sentences)
    after_eos = ids.copy()  # whatever follows the first EOS is not part of the sentence
    end = int(np.flatnonzero(ids[0] == translation.EOS)[0])
    after_eos[0, end + 1 : end + 4] = ids[1, :3]
    assert tokenizer.decode(after_eos) == list(sentences)
    cut = translation.Tokenizer(tokenizer.proto, max_len=4)
    short = cut.encode(sentences)
    assert (short[:, -1] == translation.EOS).all() and (short > 0).all()
    assert (cut.truncated, cut.seen) == (2, 2)


def test_corpus_metrics_translate_every_pair_of_a_split(trained) -> None:
    """BLEU and chrF of the trained params over a split: every pair translated once, whatever the
    batch size (the last batch is padded), against the split's own reference texts."""
    import sacrebleu

    from configs import translation as translation_config
    from stages import artifacts, checks
    from stages.setup import context
    from tasks.sources import MappedSource

    config = translation_config.get_config("runlocal")
    config.train.num_epochs = 1
    ctx = context(config, trained, checks.check_train)
    params, ctx = artifacts.restore_params(ctx)
    pairs = MappedSource(ctx.split("eval"), np.arange(5))
    model = Transformer(translation.model_config(config, config.data.vocab_size))
    tokenizer = ctx.split("train").tokenizer
    args = (model, tokenizer, params, pairs, config.data.max_len)
    hyps, refs = translation.translate_split(*args, batch_size=4)
    assert translation.translate_split(*args, batch_size=8) == (hyps, refs)
    assert refs == [str(t) for t in pairs.take(np.arange(5))["target"]] and len(hyps) == 5
    got = ctx.task.corpus_metrics(params, pairs)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_describe_shows_each_pair_as_text_for_the_galleries(trained) -> None:
    """The report's galleries of a text task: each pair as 'source → target trained on', the
    model's greedy translation, and a shuffled pair's own target; rendered as a Markdown row."""
    from configs import translation as translation_config
    from stages import artifacts, checks, gallery
    from stages.setup import context

    config = translation_config.get_config("runlocal")
    config.train.num_epochs = 1
    ctx = context(config, trained, checks.check_train)
    params, ctx = artifacts.restore_params(ctx)
    train = ctx.split("train")
    columns = train.take(np.arange(train.num_examples))
    shuffled = np.flatnonzero(columns["shuffled"])[:2]
    kept = np.flatnonzero(~columns["shuffled"])[:2]
    positions = np.concatenate([shuffled, kept])
    assert shuffled.size == 2
    rows = train.take(positions)
    shown = ctx.task.describe(params, rows)
    model = Transformer(translation.model_config(config, config.data.vocab_size))
    hyps, _ = translation.translate_split(
        model, train.tokenizer, params, MappedSource(train, positions), config.data.max_len
    )
    for i in range(positions.size):
        assert shown["text"][i] == f"{rows['source'][i]} → {rows['target'][i]}"
        assert shown["caption"][i].startswith(f"model: {hyps[i]}")
        own = f"(shuffled; its own target: {rows['clean_target'][i]})"
        assert (own in shown["caption"][i]) == bool(rows["shuffled"][i])
        assert rows["clean_target"][i] != rows["target"][i] or not rows["shuffled"][i]
    result = {
        "run": "r",
        "self_influence": [
            {"id": 1, "caption": shown["caption"][0], "text": "a | b", "self_influence": 2.0}
        ],
        "queries": [],
    }
    assert "| 1 | 1 | a \\| b — model: " in gallery._markdown(result)
