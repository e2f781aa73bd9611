"""The jitted, sharded steps of the pipeline: each ``jit_*`` factory wraps a function from
influence/ (named after it) with explicit in/out shardings, so the same code runs on 1 device,
8 fake CPU devices or a pod slice.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from influence import distill, factorised, krylov, scoring, tokens
from influence.hvp import HVP
from influence.selection import Selection
from parallel.mesh import DATA_AXIS
from parallel.sharding import batch_sharding, replicated, stacked_shardings


def jit_train_step(
    objective: Callable[[Any, Any, Any], tuple[jax.Array, Any]],
    optimizer: optax.GradientTransformation,
    trainable: Selection,
    state_sh: Any,
    mesh: Mesh,
) -> Callable[[dict, dict], tuple[dict, jax.Array]]:
    """One optimizer step over a 'data'-sharded batch; state {'params', 'opt_state'} keeps its
    shardings and is donated.

    ``objective(θ_T, params, batch) → (loss, params')`` is differentiated in the trainable leaves
    θ_T only (``trainable.select(params)``, the optimizer's state is over those); ``params'`` is
    the params with their state leaves updated (BatchNorm statistics), into which the updated
    θ_T is merged."""

    def step(state: dict, batch: dict) -> tuple[dict, jax.Array]:
        theta = trainable.select(state["params"])
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (loss, params), grads = grad_fn(theta, state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], theta)
        params = trainable.merge(params, optax.apply_updates(theta, updates))
        return {"params": params, "opt_state": opt_state}, loss

    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sharding(mesh)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=0,
    )


def krylov_shardings(param_sh: Any, mesh: Mesh) -> krylov.KrylovState:
    return krylov.KrylovState(krylov_basis=stacked_shardings(param_sh), hessenberg=replicated(mesh))


def jit_init_krylov_state(
    params_like: Any, num_iters: int, param_sh: Any, mesh: Mesh
) -> Callable[[jax.Array], krylov.KrylovState]:
    """key → initial Krylov state, created directly in its sharded layout (never on one device)."""
    fn = lambda key: krylov.init_state(params_like, num_iters, key)  # noqa: E731
    return jax.jit(fn, out_shardings=krylov_shardings(param_sh, mesh))


def jit_take_piece(
    state_sh: krylov.KrylovState,
) -> Callable[[krylov.KrylovState, tuple[int, int], tuple[int, int]], krylov.KrylovState]:
    """(state, rows, columns) → basis rows [r0, r1) and Hessenberg columns [c0, c1), laid out like
    the state: the piece a Krylov save writes (``checkpoints/pieces.py``). Starts are traced, so
    one program serves every piece of a size (``arnoldi.checkpoint_every`` iterations)."""

    def take(state: krylov.KrylovState, r0: Any, c0: Any, rows: int, columns: int) -> Any:
        return krylov.KrylovState(
            krylov_basis=jax.tree.map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, r0, rows, 0), state["krylov_basis"]
            ),
            hessenberg=jax.lax.dynamic_slice_in_dim(state["hessenberg"], c0, columns, 1),
        )

    fn = jax.jit(take, static_argnums=(3, 4), out_shardings=state_sh)
    return lambda state, rows, columns: fn(
        state, rows[0], columns[0], rows[1] - rows[0], columns[1] - columns[0]
    )


def jit_write_piece(
    state_sh: krylov.KrylovState,
) -> Callable[[krylov.KrylovState, krylov.KrylovState, int, int], krylov.KrylovState]:
    """(state, piece, r0, c0) → the state with the piece's rows and columns written in at r0 and
    c0 (a restore assembling the saved pieces; the incoming state is donated)."""

    def write(state: krylov.KrylovState, piece: krylov.KrylovState, r0: Any, c0: Any) -> Any:
        return krylov.KrylovState(
            krylov_basis=jax.tree.map(
                lambda s, p: jax.lax.dynamic_update_slice_in_dim(s, p.astype(s.dtype), r0, 0),
                state["krylov_basis"],
                piece["krylov_basis"],
            ),
            hessenberg=jax.lax.dynamic_update_slice_in_dim(
                state["hessenberg"], piece["hessenberg"], c0, 1
            ),
        )

    return jax.jit(write, donate_argnums=0, out_shardings=state_sh)


def jit_arnoldi_step(
    hvp: HVP,
    param_sh: Any,
    vector_sh: Any,
    mesh: Mesh,
    breakdown_tol: float,
    orthogonalization: str,
    block_rows: int = krylov.DEFAULT_BLOCK_ROWS,
) -> krylov.StepFn:
    """Algorithm 1 lines 3–9 jitted over the mesh; the incoming state is donated (no second copy
    of the basis). ``param_sh`` lays out the full params, ``vector_sh`` the vectors the basis is
    made of (the selected leaves, ``influence/selection.py``)."""
    state_sh = krylov_shardings(vector_sh, mesh)
    repl = replicated(mesh)
    step = functools.partial(
        krylov.arnoldi_step,
        hvp,
        breakdown_tol=breakdown_tol,
        orthogonalization=orthogonalization,
        block_rows=block_rows,
    )
    return jax.jit(
        step,
        in_shardings=(state_sh, param_sh, batch_sharding(mesh), repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )


def jit_to_parameter_space(vector_sh: Any, mesh: Mesh) -> Callable[[jax.Array, Any], Any]:
    """G = Uᵀ Q (Alg. 1 line 17) with G sharded like the (selected) params."""
    eig_sh = stacked_shardings(vector_sh)
    return jax.jit(
        distill.to_parameter_space,
        in_shardings=(replicated(mesh), eig_sh),
        out_shardings=eig_sh,
    )


def jit_products(
    per_example_loss: Callable,
    param_sh: Any,
    vector_sh: Any,
    mesh: Mesh,
    tangent_chunk: int | None,
    selection: Selection | None = None,
    checked: bool = False,
    mode: str = "forward",
    sqnorm: bool = False,
) -> scoring.Products:
    """(params, eigvecs, batch) → (batch, p̃) projections, rows sharded over 'data'; the
    eigenvectors span the ``selection``'s leaves, laid out by ``vector_sh``. ``mode``: forward
    (JVPs, ``tangent_chunk`` tangents at a time) or reverse (per-example gradients and one GEMM,
    dense and conv layers in the factorised form of ``influence/factorised.py``; ``tangent_chunk``
    must be None). ``checked``: also return whether every projection of the
    global batch is finite (replicated, computed in the same program, so reading it waits for
    this batch only). ``sqnorm``: one more column, ‖∇ℓ(x)‖² (the tail term's), in forward mode
    from a reverse pass in the same program (its memory counted with the rest).
    ``parallel/products.py`` chooses the mode and chunking."""
    # Each device computes its own rows' per-example gradients (shard_map over 'data'): left to
    # the SPMD partitioner, the vmapped conv weight gradients of a batch sharded over 'data' came
    # out wrong on every device but the first (JAX 0.10.2, CPU; off by up to 100% on the small
    # CNN, tests/test_projection.py). Params and eigenvectors enter whole; the differentiated
    # inputs are cast to device-varying, else shard_map's autodiff sums their gradients over the
    # devices.
    vary = lambda x: jax.lax.pcast(x, DATA_AXIS, to="varying")  # noqa: E731
    reverse = jax.shard_map(
        factorised.make_factorised_products(per_example_loss, selection, vary, sqnorm),
        mesh=mesh,
        in_specs=(P(), P(), P(DATA_AXIS)),
        out_specs=P(DATA_AXIS),
    )
    if mode == "forward":
        forward = scoring.make_forward_products(per_example_loss, tangent_chunk, selection)
        if sqnorm:
            none = lambda v: jax.tree.map(lambda x: x[:0], v)  # noqa: E731
            project = lambda p, v, b: jnp.concatenate(  # noqa: E731
                [forward(p, v, b), reverse(p, none(v), b)], axis=1
            )
        else:
            project = forward
    elif mode == "reverse" and tangent_chunk is None:
        project = reverse
    else:
        raise ValueError(f"mode={mode!r} with tangent_chunk={tangent_chunk}")
    rows = NamedSharding(mesh, P(DATA_AXIS, None))
    if checked:
        fn = lambda *args: (g := project(*args), jnp.all(jnp.isfinite(g)))  # noqa: E731
        out_shardings = (rows, replicated(mesh))
    else:
        fn, out_shardings = project, rows
    return jax.jit(
        fn,
        in_shardings=(param_sh, stacked_shardings(vector_sh), batch_sharding(mesh)),
        out_shardings=out_shardings,
    )


def jit_example_grads(
    per_example_loss: Callable,
    param_sh: Any,
    vector_sh: Any,
    mesh: Mesh,
    selection: Selection | None = None,
) -> Callable[[Any, dict], Any]:
    """(params, batch) → the q per-example gradients ∇ℓ(z) of a small replicated batch as a
    stacked (q, …) pytree over the selected leaves, laid out like the eigenvectors: the query
    gradients that the tail term of train → test influence projects every example onto."""

    return jax.jit(
        functools.partial(scoring.example_grads, per_example_loss, selection=selection),
        in_shardings=(param_sh, replicated(mesh)),
        out_shardings=stacked_shardings(vector_sh),
    )


def jit_token_products(
    per_token_loss: Callable,
    param_sh: Any,
    vector_sh: Any,
    mesh: Mesh,
    selection: Selection | None = None,
    tangent_chunk: int | None = None,
) -> tokens.TokenProducts:
    """(params, tangents, batch) → (batch, k, length) per-token contributions ⟨∇ℓ_t(x), v_j⟩ of a
    'data'-sharded batch to the k stacked ``tangents`` (``influence/tokens.py``: one forward-mode
    JVP), replicated: they are few (k × length per row), and every process then ranks the whole
    batch by its rows' sums (the explain stage's running top-k)."""
    return jax.jit(
        tokens.make_token_products(per_token_loss, selection, tangent_chunk),
        in_shardings=(param_sh, stacked_shardings(vector_sh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def jit_example_rows(
    per_example_loss: Callable,
    param_sh: Any,
    mesh: Mesh,
    selection: Selection | None = None,
    reduce: Callable[[Any, jax.Array, Any], Any] | None = None,
) -> Callable[..., Any]:
    """(params, tangents, batch) → (per-example gradients ∇ℓ(x) over the selected leaves,
    stacked with rows sharded over 'data'; (rows, k) products ⟨∇ℓ(x), t_j⟩ with the k stacked
    ``tangents``), each device computing its own rows under ``shard_map`` (as the reverse
    products: the SPMD-partitioned vmapped conv gradients were wrong, see ``jit_products``).

    With ``reduce(grads, mask, operands) → sums`` (a pytree) the program is (params, batch, mask,
    operands) → the sums over every row of the global batch, replicated: per-device partial sums
    of the rows' statistics (``mask`` marks the real rows of a padded batch; ``operands``, any
    replicated pytree the statistics need, e.g. EK-FAC's eigenbases, passed as arguments rather
    than baked into the program as constants) and one ``psum`` over 'data' per leaf (the
    all-reduce of a data-parallel statistics pass, ``methods/passes.py``).
    """
    vary = lambda x: jax.lax.pcast(x, DATA_AXIS, to="varying")  # noqa: E731

    def grads_of(params: Any, batch: dict) -> Any:
        return scoring.example_grads(per_example_loss, jax.tree.map(vary, params), batch, selection)

    def rows(params: Any, tangents: Any, batch: dict) -> Any:
        grads = grads_of(params, batch)
        dots = sum(
            jnp.tensordot(g.reshape(g.shape[0], -1), t.reshape(t.shape[0], -1), axes=(1, 1))
            for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangents), strict=True)
        )
        return grads, jnp.asarray(dots, jnp.float32)

    if reduce is not None:
        return _jit_sums(lambda p, b, m, o: reduce(grads_of(p, b), m, o), param_sh, mesh)
    program = jax.shard_map(
        rows, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS)
    )
    return jax.jit(program, in_shardings=(param_sh, replicated(mesh), batch_sharding(mesh)))


def jit_layer_sums(
    per_example_loss: Callable,
    param_sh: Any,
    mesh: Mesh,
    selection: Selection | None,
    reduce: Callable[[list[factorised.Record], jax.Array, Any], Any],
) -> Callable[..., Any]:
    """(params, batch, mask, operands) → Σ over the real rows of ``reduce(records, mask,
    operands)``, replicated:
    ``jit_example_rows``' statistics pass over the selected dense layers' inputs and output
    gradients (``influence.factorised.make_layer_records``) instead of per-example gradients
    (K-FAC's factors, ``methods/ekfac.py``): per-device sums, one ``psum`` over 'data' per leaf."""
    vary = lambda x: jax.lax.pcast(x, DATA_AXIS, to="varying")  # noqa: E731
    records = factorised.make_layer_records(per_example_loss, selection, vary)
    return _jit_sums(lambda p, b, m, o: reduce(records(p, b), m, o), param_sh, mesh)


def _jit_sums(stats: Callable[[Any, dict, jax.Array, Any], Any], param_sh: Any, mesh: Mesh) -> Any:
    """``stats(params, rows, mask, operands)`` of each device's rows of a 'data'-sharded batch,
    summed over the devices (one ``psum`` per leaf) and replicated: a data-parallel statistics
    program, (params, batch, mask, operands) → sums."""

    def sums(params: Any, batch: dict, mask: jax.Array, operands: Any) -> Any:
        partial = stats(params, batch, mask, operands)
        return jax.tree.map(lambda s: jax.lax.psum(s, DATA_AXIS), partial)

    rows_sh, repl = batch_sharding(mesh), replicated(mesh)
    program = jax.shard_map(
        sums, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P()), out_specs=P()
    )
    return jax.jit(program, in_shardings=(param_sh, rows_sh, rows_sh, repl), out_shardings=repl)
