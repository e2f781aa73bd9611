"""Input checks several methods share; each raises ``InputError`` with one line naming the fix,
before any work (``Method.check``)."""

import ml_collections
from jax.sharding import Mesh

from parallel.mesh import DATA_AXIS
from runtime.errors import InputError

# Queries the tail's train → test takes (each one more tangent per example and one more stored
# float), and those of every method scored by full-gradient products.
MAX_TAIL_QUERIES = 256


def divisible(value: int, mesh: Mesh, field: str, mesh_field: str = "mesh.data") -> None:
    """A global batch size of ``field`` splits evenly over the 'data' axis."""
    data = mesh.shape[DATA_AXIS]
    if value < 1 or value % data:
        raise InputError(
            f"{field}={value} is not a positive multiple of the {data} devices on the 'data' axis; "
            f"change {field} or {mesh_field}"
        )


def hvp_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """HVP batches (every method that takes HVPs draws them like Arnoldi) split over 'data'."""
    divisible(config.arnoldi.hvp_batch_size, mesh, "arnoldi.hvp_batch_size")


def full_products(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Every method scored by full-gradient products instead of eigenpairs (graddot, tracin and
    the operator methods): no tail, few enough queries."""
    del mesh
    name = config.method.name
    if config.distill.tail != "none":
        raise InputError(
            f"method.name={name} with distill.tail={config.distill.tail}: it has no subspace to "
            "add a tail to (its approximation of H⁻¹ covers every direction); set "
            "distill.tail=none"
        )
    if config.score.num_queries > MAX_TAIL_QUERIES:
        raise InputError(
            f"method.name={name} with score.num_queries={config.score.num_queries}: its train → "
            "test stores one product per query beside each training example (each query is a "
            f"tangent of its own), so it takes at most {MAX_TAIL_QUERIES} queries; lower "
            "score.num_queries"
        )


def solver(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """lissa and cg: a damping, blocks of vectors, HVP batches that split over 'data'."""
    full_products(config, mesh)
    m = config.method
    if not m.damping >= 0:
        raise InputError(f"method.damping={m.damping} must be >= 0")
    if m.block < 1:
        raise InputError(f"method.block={m.block} must be at least 1")
    divisible(m.hvp_batch_size, mesh, "method.hvp_batch_size")


def layerwise(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """hyperinf and datainf: their damping and the size bound of a layer's matrix."""
    full_products(config, mesh)
    m = config.method
    if not m.damping >= 0 or not m.damping_ratio >= 0:
        raise InputError(
            f"method.damping={m.damping} and method.damping_ratio={m.damping_ratio} must be >= 0"
        )
    if m.max_layer_params < 1:
        raise InputError(f"method.max_layer_params={m.max_layer_params} must be positive")


def tolerance(config: ml_collections.ConfigDict) -> None:
    """cg and hyperinf (Schulz): an iterative method's tolerance and iteration cap."""
    m = config.method
    if not 0 < m.tol < 1 or m.max_iters < 1:
        raise InputError(
            f"method.tol={m.tol} must be in (0, 1) and method.max_iters={m.max_iters} at least 1"
        )
