"""The fit stage: the configured method's artifact (``methods/``), fitted once and cached.

``config.method.name`` selects the method (``methods/registry.py``). Its fit runs here, with
whatever resumption it has of its own (Arnoldi's Krylov state, ``methods/arnoldi.py``); the
artifact is saved in ``<workdir>/methods/<name>/fitted`` with the method's fingerprint
(``stages/artifacts.save_fitted``) and reused while it matches: a changed config is a one-line
error naming the field, and the saved artifact stays as it was. An artifact that cannot be read
is derived data: it is moved aside and fitted again.
"""

import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from checkpoints.checkpointer import Checkpointer, UnreadableCheckpointError
from methods import registry
from runtime import workdir
from stages import artifacts
from stages.setup import context


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The method's input checks (an unknown method name among them)."""
    registry.of(config).check(config, mesh)


# The input checks of this stage; a job of several stages runs them all before the first.
CHECK = check


def run(config: ml_collections.ConfigDict, directory: epath.PathLike) -> None:
    ctx = context(config, directory, check)
    method = ctx.method
    if not method.saves_fit:
        logging.info("method %s: nothing to fit (%s)", method.name, method.equation)
        return
    params, ctx = artifacts.restore_params(ctx)
    try:
        found = artifacts.find_fitted(ctx)
    except UnreadableCheckpointError as e:  # derived data: fitted again
        logging.warning("%s; fitting %s again", e, method.name)
        with Checkpointer(ctx.results / workdir.FITTED, async_save=False) as ckpt:
            ckpt.quarantine_all()
        found = None
    if found is not None:
        logging.info("%s already fitted in %s; nothing to do", method.name, ctx.results)
        return
    logging.info("fitting %s: %s", method.name, method.equation)
    artifacts.save_fitted(ctx, method.fit(ctx, params))
    logging.info("%s: its fit is saved in %s", method.name, ctx.results / workdir.FITTED)
