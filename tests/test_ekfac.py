"""EK-FAC (methods/ekfac.py) against its explicit float64 formulas on a tiny model: a Dense layer
applied at every position of a 3-token input (so A and S pool positions and G_n sums them), tanh,
mean over positions, a Dense head; the first layer's bias selected (the input column of 1s), the
head's not. The fit's two data-parallel passes run on a 'data' axis of 4 with a padded last
batch; the scores through the operator scorer (parallel/operator_products.py). The references:
per-example layer inputs and output gradients derived by hand in numpy float64 (checked against
``jax.grad`` under x64), then A, S, their eigh, Λ = mean((Q_Aᵀ G_n Q_S)²), λ and
P G = Q_A ((Q_Aᵀ G Q_S) / (Λ + λ)) Q_Sᵀ. K-FAC's eigenvalues λ_A ⊗ λ_S in the same basis give
other scores: the correction is what is tested, not the basis alone."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from influence import ekfac as ekfac_math
from influence import scoring
from influence.selection import Selection
from methods import dense_layers, ekfac, registry
from methods.base import Context
from parallel import operator_products, sharding
from parallel.mesh import make_mesh
from runtime.errors import InputError
from tasks.base import Task
from tasks.sources import ArraySource
from tests.pipeline_helpers import tiny_config

N, QUERIES, T, D_IN, HIDDEN, CLASSES = 12, 3, 3, 5, 4, 3
L2, DEVICES, BATCH = 1e-3, 4, 8  # 12 = 8 + 4 padded rows: the mask is exercised
INCLUDE = "Dense_0/.*|Dense_1/kernel"


class Pooled(nn.Module):
    """Dense at each of T positions, tanh, mean over positions, Dense head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(HIDDEN)(x))
        return nn.Dense(CLASSES)(h.mean(axis=1))


class WithConv(nn.Module):
    """A conv kernel beside a Dense one, and a LayerNorm."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(2, (2,))(x)
        return nn.Dense(CLASSES)(nn.LayerNorm()(x.reshape(x.shape[0], -1)))


class General(nn.Module):
    """A 2-D kernel named like a Dense one that is not an ``nn.Dense``'s."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.DenseGeneral(CLASSES)(x.mean(axis=1))


def _loss(model: nn.Module):
    def loss(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    return loss


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "id": np.arange(n, dtype=np.int64),
        "x": rng.normal(size=(n, T, D_IN)).astype(np.float32),
        "label": rng.integers(0, CLASSES, n).astype(np.int32),
    }


def _context(tmp_path, model: nn.Module | None = None, include: str = INCLUDE) -> Context:
    model = model or Pooled()
    config = tiny_config(mesh__num_devices=DEVICES, score__batch_size=BATCH, l2=L2)
    config.method.name = "ekfac"
    x = jnp.zeros((1, T, D_IN))
    task = Task(
        name="tiny",
        init_params=lambda key: model.init(key, x)["params"],
        per_example_loss=_loss(model),
        splits={"train": ArraySource(_data(N, 0)), "eval": ArraySource(_data(QUERIES, 1))},
        input_columns=("x", "label"),
    )
    mesh = make_mesh(-1, 1, DEVICES)
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    param_sh = sharding.param_shardings(params_like, mesh, config.mesh.min_shard_size)
    selection = Selection.build(params_like, include)
    method = registry.get("ekfac")
    return Context(config, tmp_path, mesh, task, params_like, param_sh, selection, method)


def _explicit_layers(params, data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer (inputs ã (n, T, fan_in), output gradients δ (n, T, out)) by hand in float64:
    ℓ = CE(softmax(m W₁ + b₁)), m = mean_t tanh(z_t), z_t = x_t W₀ + b₀; e = softmax − onehot,
    δ₁ = e at one position, δ₀_t = (e W₁ᵀ / T) ⊙ (1 − tanh(z_t)²)."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    x, y = data["x"].astype(np.float64), data["label"]
    h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    m = h.mean(axis=1)
    logits = m @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    e = probs - np.eye(CLASSES)[y]
    delta0 = (e @ p["Dense_1"]["kernel"].T)[:, None, :] / T * (1 - h**2)
    ones = np.ones((*x.shape[:2], 1))
    return {
        "Dense_0": (np.concatenate([x, ones], axis=2), delta0),  # bias selected: column of 1s
        "Dense_1": (m[:, None, :], e[:, None, :]),  # bias not selected
    }


def _grads(layers):
    """Per-example (n, fan_in, out) G_n = Σ_t ã_t δ_tᵀ of each layer."""
    return {k: np.einsum("nti,nto->nio", a, d) for k, (a, d) in layers.items()}


def _explicit_fit(layers, ratio: float, corrected: bool = True):
    """Per layer (A, S, Q_A, Q_S, Λ, λ): EK-FAC's, or K-FAC's (Λ = λ_A ⊗ λ_S) with ``corrected``
    False."""
    out, grads = {}, _grads(layers)
    for k, (a, d) in layers.items():
        cov_a = np.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
        cov_s = np.einsum("nti,ntj->ij", d, d) / (d.shape[0] * d.shape[1])
        (ea, qa), (es, qs) = np.linalg.eigh(cov_a), np.linalg.eigh(cov_s)
        coords = np.einsum("ia,nio,ob->nab", qa, grads[k], qs)
        lam = np.mean(coords**2, axis=0) if corrected else np.outer(ea, es)
        out[k] = (cov_a, cov_s, qa, qs, lam, ratio * lam.mean() + L2)
    return out


def _apply(fitted, grads):
    """P G per layer, G (n, fan_in, out)."""
    return {
        k: np.einsum("ia,nab,ob->nio", qa, np.einsum("ia,nio,ob->nab", qa, g, qs) / (lam + d), qs)
        for k, g in grads.items()
        for _, _, qa, qs, lam, d in [fitted[k]]
    }


def _scores(fitted, train, query):
    """(self-influence (n,), train → test (n, queries)) of the explicit preconditioner."""
    solved_train, solved_query = _apply(fitted, train), _apply(fitted, query)
    self_influence = sum(np.einsum("nio,nio->n", train[k], solved_train[k]) for k in train)
    cross = sum(np.einsum("nio,qio->nq", train[k], solved_query[k]) for k in train)
    return self_influence, cross


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The fit and the scorer's rows on the tiny model, and the explicit layers of both splits."""
    ctx = _context(tmp_path_factory.mktemp("ekfac"))
    params = jax.device_put(ctx.task.init_params(jax.random.key(0)), ctx.param_sh)
    result = ekfac.fit(ctx, params)
    operator = ctx.method.operator(ctx, params, result.operator)
    train, query = _data(N, 0), _data(QUERIES, 1)
    inputs = lambda d: {k: jnp.asarray(d[k]) for k in ("x", "label")}  # noqa: E731
    tangents = operator.solve(
        scoring.example_grads(ctx.task.per_example_loss, params, inputs(query), ctx.selection)
    )
    program = operator_products.OperatorProgram(
        ctx.task.per_example_loss,
        ctx.param_sh,
        ctx.mesh,
        ctx.selection,
        operator.solve,
        batch_size=N,
        num_steps=1,
        name="ekfac",
    )
    rows = program(params, tangents, {k: train[k] for k in ("x", "label")}).local()
    host = jax.device_get(params)
    return types.SimpleNamespace(
        result=result,
        rows=rows,
        train=_explicit_layers(host, train),
        query=_explicit_layers(host, query),
        ctx=ctx,
        params=host,
    )


def test_hand_derived_gradients_are_jax_grads(fitted):
    """The reference's G_n = Σ_t ã_t δ_tᵀ are the float64 per-example gradients."""
    ctx, host = fitted.ctx, fitted.params
    grads = _grads(fitted.train)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), host)
        data = {k: jnp.asarray(v) for k, v in _data(N, 0).items() if k != "id"}
        data["x"] = data["x"].astype(jnp.float64)
        want = jax.device_get(scoring.example_grads(ctx.task.per_example_loss, params, data))
    layer0 = np.concatenate([want["Dense_0"]["kernel"], want["Dense_0"]["bias"][:, None]], 1)
    np.testing.assert_allclose(grads["Dense_0"], layer0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["Dense_1"], want["Dense_1"]["kernel"], rtol=1e-10, atol=1e-12)


def test_factors_eigenbases_and_corrected_eigenvalues(fitted):
    """A, S (from the saved eigenpairs), Λ and λ against float64; the bases agree up to each
    eigenvector's sign, so Q_Aᵀ Q_A,explicit is ±1 on its diagonal."""
    result, ctx = fitted.result, fitted.ctx
    state = result.operator
    layout = dense_layers.layers(ctx.vectors_like, "ekfac")
    assert [(x.kernel, x.bias, x.fan_in) for x in layout] == [
        ("Dense_0/kernel", "Dense_0/bias", D_IN + 1),
        ("Dense_1/kernel", None, HIDDEN),
    ]
    got = {k: dense_layers.per_layer(layout, jax.device_get(v)) for k, v in state.items()}
    explicit = _explicit_fit(fitted.train, ctx.config.method.damping_ratio)
    for i, name in enumerate(("Dense_0", "Dense_1")):
        cov_a, cov_s, qa, qs, lam, damping = explicit[name]
        for q, e, cov, q_want in (
            (got["activation_eigenvectors"][i], got["activation_eigenvalues"][i], cov_a, qa),
            (got["gradient_eigenvectors"][i], got["gradient_eigenvalues"][i], cov_s, qs),
        ):
            q = q.astype(np.float64)
            np.testing.assert_allclose(q @ np.diag(e) @ q.T, cov, atol=1e-6 * np.abs(cov).max())
            np.testing.assert_allclose(np.abs(np.diag(q.T @ q_want)), 1.0, atol=1e-4)
        np.testing.assert_allclose(got["eigenvalues"][i], lam, rtol=1e-4, atol=1e-6 * lam.max())
        assert float(got["damping"][i]) == pytest.approx(damping, rel=1e-5)
    assert result.summary["num_examples"] == N


def test_scores_are_ekfac_and_not_kfac(fitted):
    """Self-influence and train → test through the operator scorer against EK-FAC's explicit
    formula (1e-4), and far from K-FAC's (λ_A ⊗ λ_S in the same eigenbasis)."""
    rows, train_layers = fitted.rows, fitted.train
    ratio = fitted.ctx.config.method.damping_ratio
    train, query = _grads(train_layers), _grads(fitted.query)
    self_influence, cross = _scores(_explicit_fit(train_layers, ratio), train, query)
    assert rows.shape == (N, QUERIES + 1)
    np.testing.assert_allclose(rows[:, -1], self_influence, rtol=1e-4)
    np.testing.assert_allclose(rows[:, :-1], cross, rtol=1e-4, atol=1e-4 * np.abs(cross).max())
    kfac_self, kfac_cross = _scores(_explicit_fit(train_layers, ratio, False), train, query)
    assert np.max(np.abs(rows[:, -1] / kfac_self - 1)) > 0.05
    assert np.max(np.abs(rows[:, :-1] - kfac_cross)) > 0.05 * np.abs(kfac_cross).max()


@pytest.mark.parametrize(
    ("include", "message"),
    [
        (
            "LayerNorm_0/.*|Conv_0/bias",
            r"^method.name=ekfac preconditions Dense layers, and none of the 3 selected leaves "
            r"\(.*\) is a 2-D Dense kernel: select the Dense layers \(config.params\)$",
        ),
        (
            "",
            r"^method.name=ekfac preconditions Dense layers only .*; Conv_0/kernel has shape "
            r"\(2, 5, 2\): select the Dense layers \(config.params\)$",
        ),
        (
            "Dense_0/.*|LayerNorm_0/scale",
            r"LayerNorm_0/scale has shape \(6,\): select the Dense layers",
        ),
    ],
)
def test_anything_but_dense_layers_is_one_line_before_any_work(tmp_path, include, message):
    ctx = _context(tmp_path, WithConv(), include)
    with pytest.raises(InputError, match=message) as error:
        ctx.method.check_size(ctx.config, ctx.vectors_like)
    assert "\n" not in str(error.value)


def test_a_factor_wider_than_max_layer_params_is_refused(tmp_path):
    ctx = _context(tmp_path)
    ctx.config.method.max_layer_params = D_IN
    with pytest.raises(InputError, match=r"Dense_0/kernel needs a 6 × 6 factor, more than"):
        ctx.method.check_size(ctx.config, ctx.vectors_like)


def test_a_kernel_of_another_layer_is_one_line_when_the_fit_traces(tmp_path):
    """Names and shapes cannot tell a DenseGeneral's 2-D kernel from a Dense's: the fit's first
    trace does, before any batch is computed."""
    ctx = _context(tmp_path, General(), "")
    ctx.method.check_size(ctx.config, ctx.vectors_like)
    params = jax.device_put(ctx.task.init_params(jax.random.key(0)), ctx.param_sh)
    with pytest.raises(InputError, match=r"^method.name=ekfac: DenseGeneral_0/kernel is not the "):
        ekfac.fit(ctx, params)


def test_positions_the_loss_cannot_reach_stay_out_of_the_input_factor() -> None:
    """Padding after a sequence's end has δ = 0 (the loss is masked there): A sums a aᵀ over the
    other positions of the rows in the mask only, and counts them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    d = rng.standard_normal((3, 5, 2)).astype(np.float32)
    d[0, 3:] = 0.0  # row 0: two padded positions
    mask = np.array([1.0, 1.0, 0.0], np.float32)  # row 2: batch padding
    a, s, count = ekfac_math.factor_sums(jnp.asarray(x), jnp.asarray(d), jnp.asarray(mask))
    live = [(0, t) for t in range(3)] + [(1, t) for t in range(5)]
    want_a = sum(np.outer(x[b, t], x[b, t]) for b, t in live)
    want_s = sum(np.outer(d[b, t], d[b, t]) for b, t in live)
    np.testing.assert_allclose(a, want_a, rtol=1e-5)
    np.testing.assert_allclose(s, want_s, rtol=1e-5)
    assert int(count) == len(live)
