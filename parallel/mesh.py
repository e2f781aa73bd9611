"""The device mesh: a 2-D ('data', 'model') grid with Auto axis types, laid out by topology.

Batches are split over 'data'; large parameter leaves (and with them the Krylov basis and the
eigenvectors) over 'model'. The device order comes from JAX's topology-aware builders, as in
big_vision and MaxText: within one slice ``jax.make_mesh`` (on a TPU slice, `jax.devices()` order
is not the physical torus, so 'model' neighbours would otherwise be chips apart); across slices
(``num_slices`` > 1, a multi-slice TPU job or several hosts joined by a slower network)
``mesh_utils.create_hybrid_device_mesh`` keeps each 'model' group inside one slice's fast
interconnect and runs 'data' across slices. On CPUs and GPUs both reduce to ``jax.devices()`` in
order (GPUs sorted by id), which is what the multi-process tests rely on.

Auto axis types are required: with jax 0.10's default Explicit axes, any reshape of a sharded
array (``jnp.vdot`` flattens) raises.
"""

from collections.abc import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from influence.errors import UserError

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, MODEL_AXIS)


class MeshError(UserError):
    """A mesh shape that does not fit the devices."""


def _resolve(data: int, model: int, n: int) -> tuple[int, int]:
    """(data, model) with a -1 replaced by "all remaining devices"; checks the product is n."""
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
    return data, model


def _process_is_granule(devices: Sequence[jax.Device], num_slices: int) -> bool:
    """Whether the slices of a hybrid mesh are processes (no device reports a slice index, e.g.
    CPUs, or GPU hosts) rather than TPU slices."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == num_slices:
        return False
    if len({d.process_index for d in devices}) == num_slices:
        return True
    raise MeshError(
        f"mesh.num_slices={num_slices}, but the devices form {len(slices - {None}) or 1} slice(s) "
        f"and {len({d.process_index for d in devices})} process(es); set mesh.num_slices to "
        "the number of TPU slices (or of processes, on hardware without slices)"
    )


def make_mesh(data: int = -1, model: int = 1, num_devices: int = -1, num_slices: int = 1) -> Mesh:
    """A (data, model) mesh over the first ``num_devices`` devices (-1: all of them).

    One of ``data`` and ``model`` may be -1, meaning "all remaining devices". With
    ``num_slices`` > 1 the 'data' axis is split across slices (each slice holds
    data / num_slices rows of the mesh) and 'model' stays within a slice.
    """
    devices = jax.devices()
    if num_devices != -1:
        if not 0 < num_devices <= len(devices):
            raise MeshError(f"mesh.num_devices={num_devices} but {len(devices)} devices exist")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise MeshError("mesh.num_devices must be -1 (all devices) when running multi-process")
        devices = devices[:num_devices]
    data, model = _resolve(data, model, len(devices))
    axis_types = (AxisType.Auto, AxisType.Auto)
    if num_slices < 1 or data % num_slices:
        raise MeshError(
            f"mesh.num_slices={num_slices} must be a positive divisor of the {data} devices on "
            "the 'data' axis (the 'model' axis stays within a slice)"
        )
    if num_slices == 1:
        try:
            return jax.make_mesh((data, model), AXES, axis_types=axis_types, devices=devices)
        except ValueError as e:  # jax.make_mesh refuses devices spanning several TPU slices
            if "multi-slice" not in str(e):
                raise
            raise MeshError(
                "the devices span several TPU slices; set mesh.num_slices to their number"
            ) from e
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, model),
        (num_slices, 1),
        devices,
        process_is_granule=_process_is_granule(devices, num_slices),
    )
    return Mesh(grid, AXES, axis_types=axis_types)
