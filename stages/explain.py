"""The explain stage (``jobs.explain``): which training passages, and which of their tokens, made
the model say this?

For each prompt the task builds ONE query example z (``Task.query_from_text``: the LM tokenizes
the prompt and continues it greedily for ``steps`` tokens, or takes the given answer; the loss is
on the continuation's tokens only). With the configured method's fit restored as the score stage
restores it, each query's v = P∇L(z) (``scoring.tangents.Preconditioner``: the P of the score
stage's train → test influences), then ONE pass over the training split gives every passage x its
influence I(x, z) = ⟨∇ℓ(x), v⟩ and its tokens' shares of it, ⟨∇ℓ_t(x), v⟩, which sum to it
exactly (``influence/tokens.py``, ``scoring/explanations.py``). The top ``top_k`` proponents and
opponents of each prompt are written to ``<results>/explain/`` by process 0
(``stages/explain_text.py``): explanations.parquet, tokens.parquet, explain.md, and the same
summary on stdout.

The influence is the score stage's: for a query that is an eval example (its prompt and answer),
explain's influence of every training example equals that query's train → test influence in the
scores (with ``distill.tail``, the tail-corrected ``influence_tail``). TracIn's sum over kept
checkpoints is refused in one line.
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from methods import registry
from methods.base import Context
from parallel import sharding
from runtime.errors import InputError
from scoring import explanations, queries, tangents
from stages import artifacts, checks, explain_text
from stages.setup import context
from tasks.sources import Columns


@dataclasses.dataclass(frozen=True)
class Request:
    """What to explain: the prompts, each one's answer (None: the greedy continuation of at most
    ``steps`` tokens), and the proponents and opponents kept per prompt."""

    prompts: tuple[str, ...]
    answers: tuple[str | None, ...]
    steps: int = 8
    top_k: int = 10


def request(
    prompts: Sequence[str], prompts_file: str, answers: Sequence[str], steps: int, top_k: int
) -> Request:
    """The ``Request`` of the job's flags: the --prompt flags (with --answer, one per --prompt in
    order, or none), then the lines of --prompts (a tab then an answer explains that answer);
    bad flags are one line."""
    if answers and len(answers) != len(prompts):
        raise InputError(
            f"--answer was given {len(answers)} times for {len(prompts)} --prompt flags; give "
            "one answer per --prompt, in order, or none"
        )
    pairs = list(zip(prompts, answers or [None] * len(prompts), strict=True))
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"--prompts={prompts_file}: no such file")
        for line in path.read_text("utf-8").splitlines():
            if line.strip():
                prompt, tab, answer = line.partition("\t")
                pairs.append((prompt, answer if tab else None))
    if not pairs:
        raise InputError("nothing to explain: give --prompt=TEXT (repeatable) or --prompts=FILE")
    if steps < 1 or top_k < 1:
        raise InputError(f"--steps={steps} and --top_k={top_k} must be at least 1")
    return Request(tuple(p for p, _ in pairs), tuple(a for _, a in pairs), steps, top_k)


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The score block's checks (its batch size and reading fields are used) and the method's."""
    checks.check_score(config, mesh)
    registry.of(config).check(config, mesh)


def _check_can_explain(ctx: Context) -> None:
    missing = [
        name
        for name in ("query_from_text", "per_token_loss", "token_texts")
        if getattr(ctx.task, name) is None
    ]
    if missing:
        raise InputError(
            f"task {ctx.task.name} cannot be explained: it has no {', '.join(missing)} "
            "(tasks/base.py); jobs.explain needs a task that builds a query from a prompt and "
            "splits its loss by token (the LM task, configs/lm.py)"
        )
    if ctx.method.checkpoints:
        raise InputError(
            f"method.name={ctx.method.name} sums over the checkpoints of train.keep_epochs, "
            "which jobs.explain does not; explain with graddot (the final params) or another "
            "method"
        )


def run(
    config: ml_collections.ConfigDict,
    directory: epath.PathLike,
    *,
    prompts: Sequence[str] = (),
    prompts_file: str = "",
    answers: Sequence[str] = (),
    steps: int = 8,
    top_k: int = 10,
) -> None:
    wanted = request(prompts, prompts_file, answers, steps, top_k)
    ctx = context(config, directory, check)
    _check_can_explain(ctx)
    params, ctx = artifacts.restore_params(ctx)
    examples = [
        ctx.task.query_from_text(params, prompt, answer, wanted.steps)
        for prompt, answer in zip(wanted.prompts, wanted.answers, strict=True)
    ]
    eig_state, eig_meta = artifacts.restore_fitted(ctx)
    v = preconditioned_gradients(ctx, params, eig_state, eig_meta, examples)
    del eig_state
    ranked = explanations.trace(ctx, params, v, len(examples), wanted.top_k)
    explain_text.write(ctx, params, ranked, wanted, examples)


def preconditioned_gradients(
    ctx: Context,
    params: Any,
    eig_state: dict[str, Any],
    eig_meta: dict[str, Any],
    examples: list[Columns],
) -> Any:
    """v = P∇L(z) of each query example, stacked like G: the eigenvalues as the score stage
    scores with (``distill.damping`` added), its σ, the method's ``Operator``."""
    eigvals = sharding.replicated_to_host(eig_state["eigvals"])
    eigvals = eigvals + np.float32(ctx.config.distill.damping)
    sigma, intrinsic = tangents.method_sigma(ctx, eigvals, eig_meta)
    operator = tangents.operator_of(ctx, params, eig_state)
    inverse = tangents.Preconditioner(ctx, eig_state, eigvals, sigma, intrinsic, operator)
    columns = {k: np.concatenate([e[k] for e in examples]) for k in ctx.task.input_columns}
    return inverse(queries.example_gradients(ctx, params, columns))
