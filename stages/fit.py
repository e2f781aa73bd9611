"""The fit job: the configured method's artifact (``methods/``), fitted once and cached.

``config.method.name`` selects the method (``methods/registry.py``). Arnoldi is fitted by its own
stage (``stages/arnoldi.py``: Krylov checkpoints, resumption); every other method's ``fit``
runs here: its eigenpairs are saved in ``<workdir>/methods/<name>/eigenpairs`` with the method's
fingerprint (``pipeline/workdir.fit_fingerprint``) and reused while it matches; a changed config
is a one-line error naming the field, and the saved artifact stays as it was.
"""

import importlib

import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from checkpoints.checkpointer import Checkpointer, UnreadableCheckpointError
from checkpoints.fingerprint import digest
from methods import registry
from runtime import outputs
from stages import artifacts
from stages import workdir as wd
from stages.setup import Stage


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The method's input checks (an unknown method name among them)."""
    registry.of(config).check(config, mesh)


# The input checks of this stage; a job of several stages runs them all before the first.
CHECK = check


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    method = registry.of(config)
    if method.stage:
        importlib.import_module(method.stage).run(config, workdir)
        return
    stage = Stage.setup(config, workdir, check)
    if method.fit is None:
        logging.info("method %s: nothing to fit (%s)", method.name, method.equation)
        return
    params, params_id = artifacts.restore_params(stage)
    with Checkpointer(stage.path(wd.EIGENPAIRS), async_save=False) as ckpt:
        try:
            found = artifacts.find_eigenpairs(ckpt, stage, params_id)
        except UnreadableCheckpointError as e:  # derived data: fitted again
            logging.warning("%s; fitting %s again", e, method.name)
            ckpt.quarantine_all()
            found = None
        if found is not None:
            logging.info("%s already fitted in %s; nothing to do", method.name, ckpt.directory)
            return
        logging.info("fitting %s: %s", method.name, method.equation)
        fitted = method.fit(stage, params)
        fingerprint = wd.fit_fingerprint(config, params_id, stage.selection, method)
        summary = {
            "method": method.name,
            "eigenpairs_id": digest(fingerprint),
            **fitted.summary,
            "influence_over": stage.selection.describe(stage.params_like),
        }
        if fitted.operator is not None:  # hyperinf, datainf: their per-layer matrices alone
            state = {"operator": fitted.operator}
        else:
            state = {
                "eigvecs": fitted.eigvecs,
                "eigvals": np.asarray(fitted.eigvals, np.float32),
                "ritz_residuals": np.asarray(fitted.ritz_residuals, np.float32),
            }
        ckpt.save(0, state, {"fingerprint": fingerprint, **summary}, force=True)
    outputs.write_json(stage.path(wd.EIGENVALUES_JSON), summary)
    logging.info("%s: its fit is saved in %s", method.name, ckpt.directory)
