"""Speed ratios of the influence pipeline on one model and one fixed batch.

    .venv/bin/python -m benchmarks.speed --model=flax_cnn --batch_size=512 --num_iters=200 --top_k=100

Every timing jits the function, warms it up once, then takes the median of ``--repeats`` calls
(fewer, but at least 3, past ``--time_budget`` seconds), each ended by ``jax.block_until_ready``;
Arnoldi is timed once, over all n steps, after compiling the step on a throwaway state. Parameters
are untrained (``task.init_params``): the costs do not depend on their values. Ratios (Schioppa et
al. 2022, "Scaling up influence functions", Algorithm 1):

1. hvp/grad: one forward-over-reverse Hessian-vector product (line 4) over one gradient of the mean
   loss on the same batch. Target <= 2.
2. arnoldi/(n*hvp): ``run_arnoldi`` for n iterations (lines 2-10) over n HVPs, i.e. the cost of
   the Gram-Schmidt passes (lines 5-7, run twice), the basis update (line 9) and the Python loop.
   Target <= 1.05. The per-iteration overhead is also measured directly: the same loop run again
   with an "HVP" that looks up the run's own H q_k (rebuilt from the Arnoldi relation), so the
   Gram-Schmidt passes see the real cancellations, and the HVP costs one row read.
3. score/forward: projecting a batch on the p̃ distilled eigenvectors (lines 17-22, one
   linearisation vmapped over p̃ JVPs) per example, over one forward pass per example; divided by p̃
   it is the cost of one JVP in units of a forward pass.

4. lookahead: the host waits for the device only one step late. ``run_arnoldi`` dispatches step
   k + 1 before reading step k's breakdown flag, and the score job reads and dispatches batch
   i + 1 before fetching batch i's projections; both against the synchronous loop that reads every
   result before the next dispatch (what round 1 did), each step drawing its batch from host
   memory as the jobs do. Ratios below 1 are the time the device no longer idles.

By default the Arnoldi step donates its Krylov state, as parallel/programs.py does (``--nodonate``
shows the cost of copying the whole basis every step); ``--orthogonalization`` picks DGKS, MGS2 or CGS2
and ``--tangent_chunk`` the products' chunking (default: one vmap over all p̃ tangents).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from influence import distill, hvp, krylov, pytree, scoring
from tasks import mnist
from tasks.sources import read_all

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "flax_cnn", ["small_cnn", "flax_cnn"], "MNIST model to time.")
flags.DEFINE_integer("batch_size", 512, "Examples in the fixed batch.")
flags.DEFINE_integer("num_iters", 200, "Arnoldi iterations n.")
flags.DEFINE_integer("top_k", 100, "Distilled eigenvectors p̃ (at most num_iters).")
flags.DEFINE_float("l2", 1e-3, "L2 coefficient of the training loss.")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (the median is reported).")
flags.DEFINE_float(
    "time_budget", 60.0, "Stop repeating a measurement after this many seconds (>= 3 calls)."
)
flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the Arnoldi start vector.")
flags.DEFINE_bool(
    "donate", True, "Donate the Krylov state to the Arnoldi step (in place), as the pipeline does."
)
flags.DEFINE_integer(
    "tangent_chunk", 0, "make_forward_products tangent_chunk; 0 = None (one vmap)."
)
flags.DEFINE_enum(
    "orthogonalization", "mgs2", sorted(krylov.ORTHOGONALIZATION), "Arnoldi Gram–Schmidt variant."
)
flags.DEFINE_integer("score_batches", 16, "Scoring batches in the lookahead comparison [4].")
flags.DEFINE_bool(
    "fresh_batches",
    False,
    "[2]: every HVP on its own batch of 5,000 MNIST examples (on the device before the loop), as "
    "the pipeline draws them; the HVP timing of [1] stays on the fixed batch.",
)
flags.DEFINE_bool("arnoldi_only", False, "Stop after [1] and [2] (HVP, Arnoldi).")
flags.DEFINE_integer("lookahead_iters", 50, "Arnoldi iterations in the lookahead comparison [4].")


def time_call(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall time in seconds of ``fn(*args)`` after one warm-up (compiling) call.

    Stops early, after at least 3 calls, once ``--time_budget`` seconds have been spent.
    """
    jax.block_until_ready(fn(*args))
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < FLAGS.time_budget):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def arnoldi_step(hvp_fn: hvp.HVP) -> krylov.StepFn:
    """The jitted Arnoldi step; it donates its Krylov state unless ``--nodonate``."""
    donate = (0,) if FLAGS.donate else ()
    return jax.jit(
        functools.partial(krylov.arnoldi_step, hvp_fn, orthogonalization=FLAGS.orthogonalization),
        donate_argnums=donate,
    )


def time_arnoldi(
    hvp_fn: hvp.HVP, params: Any, get_batch: Callable[[int], Any], num_iters: int, seed: int
) -> tuple[float, krylov.ArnoldiResult, float]:
    """(seconds, result, share of iterations that ran the second Gram–Schmidt pass) of
    ``run_arnoldi`` for ``num_iters`` steps, compile time excluded."""
    step = arnoldi_step(hvp_fn)
    key = jax.random.key(seed)
    warm = krylov.init_state(params, num_iters, key)  # throwaway state: compiles the step
    jax.block_until_ready(step(warm, params, get_batch(0), jnp.asarray(0, jnp.int32)))
    del warm
    state = jax.block_until_ready(krylov.init_state(params, num_iters, key))
    flags: list[jax.Array] = []  # read after the loop: reading one waits for its step
    start = time.perf_counter()
    result = krylov.run_arnoldi(
        step,
        state,
        params,
        get_batch,
        num_iters,
        on_iteration=lambda _done, _state, info: flags.append(info["reorthogonalized"]),
    )
    jax.block_until_ready(result.state)
    seconds = time.perf_counter() - start
    return seconds, result, float(np.mean([bool(f) for f in flags[: result.num_completed]]))


def replayed_hvp(result: krylov.ArnoldiResult) -> hvp.HVP:
    """An "HVP" that returns the run's own H q_k, rebuilt once from the Arnoldi relation
    H Q_m = Q_{m+1} H̃ (Alg. 1, lines 4-9) and looked up by k (passed as the batch).

    Run again through the same loop, it replays the iterations with the same vectors, so the
    Gram-Schmidt passes see the same cancellations (and, for dgks, skip the same second passes) as
    the real run, while the "HVP" costs one row read: the loop's time is the non-HVP overhead.
    """
    m = result.num_completed
    h = result.state["hessenberg"][: m + 1, :m]
    products = jax.jit(
        lambda basis: jax.tree.map(lambda b: jnp.tensordot(h.T, b[: m + 1], axes=1), basis)
    )(result.state["krylov_basis"])
    return lambda _params, k, _v: jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), products
    )


def arnoldi_synchronous(
    step: krylov.StepFn, state: Any, params: Any, get_batch: Callable, num_iters: int
) -> Any:
    """Round 1's loop: every step's breakdown flag is read before the next step is dispatched."""
    for k in range(num_iters):
        state, info = step(state, params, get_batch(k), jnp.asarray(k, jnp.int32))
        if bool(info["breakdown"]):
            break
    return state


def best_arnoldi_loops(
    step: krylov.StepFn, params: Any, host_batch: Callable[[int], Any], num_iters: int
) -> dict[str, float]:
    """Seconds of the lookahead loop (``run_arnoldi``) and of the synchronous one, best of 2
    each (alternating), each run after compiling the step on a throwaway state."""
    key = jax.random.key(FLAGS.seed)
    times = {}
    for name in ("synchronous", "lookahead", "synchronous", "lookahead"):  # each twice, alternating
        state = jax.block_until_ready(krylov.init_state(params, num_iters, key))
        jax.block_until_ready(step(state, params, host_batch(0), jnp.asarray(0, jnp.int32)))
        state = jax.block_until_ready(krylov.init_state(params, num_iters, key))
        start = time.perf_counter()
        if name == "lookahead":
            out = krylov.run_arnoldi(step, state, params, host_batch, num_iters).state
        else:
            out = arnoldi_synchronous(step, state, params, host_batch, num_iters)
        jax.block_until_ready(out)
        times.setdefault(name, []).append(time.perf_counter() - start)
        del out, state
    return {k: min(v) for k, v in times.items()}


def best_score_loops(
    project: Callable, params: Any, eigvecs: Any, host_batch: Callable[[int], Any]
) -> dict[str, float]:
    """Seconds of ``--score_batches`` scoring batches, overlapped (batch i + 1 dispatched before
    batch i is fetched) and synchronous, best of 2 each after a compiling run."""

    def score_loop(overlap: bool) -> float:
        start, pending, fetched = time.perf_counter(), None, 0
        for i in range(FLAGS.score_batches):
            g = project(params, eigvecs, host_batch(1000 + i))
            if not overlap:
                fetched += np.asarray(g).shape[0]
                continue
            if pending is not None:
                fetched += np.asarray(pending).shape[0]
            pending = g
        if pending is not None:
            fetched += np.asarray(pending).shape[0]
        assert fetched == FLAGS.score_batches * FLAGS.batch_size
        return time.perf_counter() - start

    score_loop(True)  # compile
    score = {"synchronous": [], "overlapped": []}
    for _ in range(2):
        score["synchronous"].append(score_loop(False))
        score["overlapped"].append(score_loop(True))
    return {k: min(v) for k, v in score.items()}


def time_lookahead(
    hvp_fn: hvp.HVP, params: Any, source: dict, num_iters: int, project: Callable, eigvecs: Any
) -> tuple[float, float]:
    """[4]: the lookahead loops against the synchronous ones, batches read from host memory."""
    n_rows = len(source["label"])
    b = FLAGS.batch_size

    def host_batch(k: int) -> dict:  # draws and ships a batch, as tasks/batching.py does
        rows = np.random.default_rng([FLAGS.seed, k]).choice(n_rows, b, replace=False)
        return jax.device_put({key: v[np.sort(rows)] for key, v in source.items()})

    arn = best_arnoldi_loops(arnoldi_step(hvp_fn), params, host_batch, num_iters)
    sc = best_score_loops(project, params, eigvecs, host_batch)
    print(
        f"[4] arnoldi {num_iters} iterations: synchronous {arn['synchronous']:.2f} s, "
        f"lookahead {arn['lookahead']:.2f} s (best of 2 each)"
    )
    print(
        f"    score {FLAGS.score_batches} batches: synchronous {sc['synchronous']:.2f} s, "
        f"overlapped {sc['overlapped']:.2f} s (best of 2 each)"
    )
    return arn["lookahead"] / arn["synchronous"], sc["overlapped"] / sc["synchronous"]


def fixed_batch(b: int) -> tuple[Any, Any, Any]:
    """(the MNIST task of ``--model``, its first ``b`` training examples on the device, untrained
    params seeded by ``--seed``)."""
    task = mnist.make_task(FLAGS.model)
    train = read_all(mnist.load_splits(num_train=b, num_eval=0, flip_fraction=0.0, seed=0)[0])
    batch = jax.device_put(task.model_inputs(train))
    return task, batch, task.init_params(jax.random.key(FLAGS.seed))


def hvp_vs_grad(task: Any, params: Any, batch: Any) -> tuple[hvp.HVP, float, float]:
    """[1]: (the HVP, seconds of one gradient of the mean loss, seconds of one HVP)."""
    hvp_fn = hvp.make_hvp(task.per_example_loss, FLAGS.l2)
    grad_fn = jax.jit(jax.grad(hvp.make_mean_loss(task.per_example_loss, FLAGS.l2)))
    v = krylov.start_vector(params, jax.random.key(FLAGS.seed + 1))
    t_grad = time_call(grad_fn, params, batch, repeats=FLAGS.repeats)
    t_hvp = time_call(jax.jit(hvp_fn), params, batch, v, repeats=FLAGS.repeats)
    print(f"\n[1] grad {t_grad * 1e3:.1f} ms, hvp {t_hvp * 1e3:.1f} ms")
    return hvp_fn, t_grad, t_hvp


def hvp_batches(task: Any, batch: Any, n: int, b: int) -> Callable[[int], Any]:
    """Batch k of the HVPs of [2]: the fixed batch, or with ``--fresh_batches`` its own draw from
    5,000 MNIST examples (all on the device before the loop), as the pipeline's default
    (fixed_batch=False)."""
    if not FLAGS.fresh_batches:
        return lambda k: batch
    pool = task.model_inputs(read_all(mnist.load_splits(5000, 0, 0.0, seed=2)[0]))
    draws = [
        np.sort(np.random.default_rng([FLAGS.seed, k]).choice(5000, b, False)) for k in range(n)
    ]
    batches = [jax.device_put({key: v[rows] for key, v in pool.items()}) for rows in draws]
    return batches.__getitem__


def orthogonality(result: krylov.ArnoldiResult) -> float:
    """max|QᵀQ - I| over the run's m + 1 basis vectors."""
    m = result.num_completed
    basis = jax.tree.map(lambda x: x[: m + 1].reshape(m + 1, -1), result.state["krylov_basis"])
    gram = sum(q @ q.T for q in jax.tree.leaves(basis))
    return float(jnp.abs(gram - jnp.eye(m + 1)).max())


def arnoldi_vs_hvps(
    hvp_fn: hvp.HVP, params: Any, get_batch: Callable, t_grad: float, t_hvp: float
) -> tuple[krylov.ArnoldiResult, str]:
    """[2]: Arnoldi vs n HVPs; the non-HVP part once more by replaying the run with its own
    H q_k, which isolates Gram-Schmidt + basis update + loop. (The run's result, the summary
    lines of [1] and [2].)"""
    t_arn, result, second = time_arnoldi(hvp_fn, params, get_batch, FLAGS.num_iters, FLAGS.seed)
    if result.breakdown:
        print(f"    note: {result.breakdown}")
    m = result.num_completed
    q_error = orthogonality(result)
    t_replay, _, second_replay = time_arnoldi(
        replayed_hvp(result), params, lambda k: jnp.asarray(k, jnp.int32), m, FLAGS.seed
    )
    overhead_ms = (t_arn - m * t_hvp) / m * 1e3
    print(f"[2] arnoldi {t_arn:.2f} s for {m} iterations = {t_arn / m * 1e3:.1f} ms/iteration")
    print(f"    non-HVP overhead: {overhead_ms:.1f} ms/iteration (arnoldi - n*hvp)")
    print(
        f"    direct, the run replayed with its own H q_k: {t_replay / m * 1e3:.1f} ms/iteration; "
        f"second Gram-Schmidt pass in {second:.0%} of iterations ({second_replay:.0%} replayed)"
    )
    print(f"    max|QᵀQ - I| over the {m + 1} basis vectors = {q_error:.2e}")
    summary = "\n".join(
        [
            f"hvp/grad = {t_hvp / t_grad:.2f} (target <= 2)",
            f"arnoldi/(n*hvp) = {t_arn / (m * t_hvp):.3f} "
            f"(target <= 1.05; overhead {overhead_ms:.1f} ms/iter)",
            f"max|QᵀQ - I| = {q_error:.2e} (target <= 1e-5)",
            f"arnoldi/(n*hvp), direct = {1 + t_replay / (m * t_hvp):.3f} "
            "(1 + replayed step / hvp; less load-sensitive)",
        ]
    )
    return result, summary


def score_vs_forward(
    task: Any, params: Any, eigvecs: Any, batch: Any
) -> tuple[Callable, float, float]:
    """[3]: scoring (p̃ JVPs through one linearisation) vs forward, per example: (the jitted
    products, seconds to score the batch, seconds of its forward pass)."""
    b = FLAGS.batch_size
    project = jax.jit(
        scoring.make_forward_products(task.per_example_loss, FLAGS.tangent_chunk or None)
    )
    forward = jax.jit(task.per_example_loss)
    t_score = time_call(project, params, eigvecs, batch, repeats=FLAGS.repeats)
    t_fwd = time_call(forward, params, batch, repeats=FLAGS.repeats)
    print(f"[3] forward {t_fwd * 1e3:.1f} ms, score {t_score * 1e3:.1f} ms for {b} examples")
    print(f"    per example: forward {t_fwd / b * 1e6:.1f} us, score {t_score / b * 1e6:.1f} us")
    return project, t_score, t_fwd


def main(argv: list[str]) -> None:
    del argv
    t_start = time.perf_counter()
    n, p, b = FLAGS.num_iters, FLAGS.top_k, FLAGS.batch_size
    if not 0 < p <= n:
        raise app.UsageError(f"--top_k={p} must be in [1, --num_iters={n}]")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print(f"os.cpu_count() = {os.cpu_count()}")
    task, batch, params = fixed_batch(b)
    print(f"model {FLAGS.model}: {pytree.num_params(params):,} parameters; batch {b}; n={n}, p̃={p}")
    hvp_fn, t_grad, t_hvp = hvp_vs_grad(task, params, batch)
    get_batch = hvp_batches(task, batch, n, b)
    result, summary = arnoldi_vs_hvps(hvp_fn, params, get_batch, t_grad, t_hvp)
    del get_batch
    m = result.num_completed
    fresh = "fresh batches" if FLAGS.fresh_batches else "fixed batch"
    header = f"{FLAGS.model}, batch {b} ({fresh}), n={m}"
    if FLAGS.arnoldi_only:
        print(f"\n--- {header}, {FLAGS.orthogonalization} ---\n{summary}")
        print(f"(benchmark wall time {time.perf_counter() - t_start:.0f} s)")
        return
    pairs = distill.distill(
        np.asarray(result.state["hessenberg"]), result.state["krylov_basis"], m, p
    )
    del result
    project, t_score, t_fwd = score_vs_forward(task, params, pairs.eigvecs, batch)
    # 4. Lookahead vs synchronous loops, data from host memory (a pool of 4 batches' worth).
    pool = read_all(
        mnist.load_splits(num_train=min(4 * b, 5000), num_eval=0, flip_fraction=0.0, seed=1)[0]
    )
    lookahead, overlapped = time_lookahead(
        hvp_fn,
        params,
        task.model_inputs(pool),
        min(n, FLAGS.lookahead_iters),
        project,
        pairs.eigvecs,
    )
    score_ratio = t_score / t_fwd
    opts = (
        f"{FLAGS.orthogonalization}, donate={FLAGS.donate}, "
        f"tangent_chunk={FLAGS.tangent_chunk or None}"
    )
    print(f"\n--- {header}, p̃={p}, {os.cpu_count()} CPU cores, {opts} ---\n{summary}")
    print(f"score/forward per example = {score_ratio:.1f} (p̃ = {p})")
    print(f"score/forward per example per eigenvector = {score_ratio / p:.2f}")
    print(f"arnoldi lookahead/synchronous = {lookahead:.3f} (one-step-late breakdown check)")
    print(f"score overlapped/synchronous = {overlapped:.3f} (batch i + 1 dispatched first)")
    print(f"(benchmark wall time {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
