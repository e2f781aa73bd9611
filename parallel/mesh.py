"""The device mesh: a 2-D ('data', 'model') grid with Auto axis types.

Batches are split over 'data'; large parameter leaves (and with them the Krylov basis and the
eigenvectors) over 'model'. Auto axis types are required: with jax 0.10's default Explicit axes, any
reshape of a sharded array (``jnp.vdot`` flattens) raises.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA_AXIS = "data"
MODEL_AXIS = "model"


class MeshError(ValueError):
    """A mesh shape that does not fit the devices."""


def make_mesh(data: int = -1, model: int = 1, num_devices: int = -1) -> Mesh:
    """A (data, model) mesh over the first ``num_devices`` devices (-1: all of them).

    One of ``data`` and ``model`` may be -1, meaning "all remaining devices".
    """
    devices = jax.devices()
    if num_devices != -1:
        if not 0 < num_devices <= len(devices):
            raise MeshError(f"mesh.num_devices={num_devices} but {len(devices)} devices exist")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise MeshError("mesh.num_devices must be -1 (all devices) when running multi-process")
        devices = devices[:num_devices]
    n = len(devices)
    if data == -1 and model == -1:
        raise MeshError("at most one of mesh.data and mesh.model may be -1")
    if data == -1:
        data = n // model if model > 0 and n % model == 0 else 0
    elif model == -1:
        model = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or model < 1 or data * model != n:
        raise MeshError(
            f"mesh data={data} x model={model} does not tile the {n} devices; set mesh.data and "
            f"mesh.model so that their product is {n} (use -1 for one of them)"
        )
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))
