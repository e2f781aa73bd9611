"""Type aliases shared by the math modules.

The loss contract of the whole framework: a *per-example loss* is a function
``(params, batch) -> losses`` where ``params`` is any pytree of arrays, ``batch`` is a dict of
arrays whose leading axis is the example axis, and ``losses`` has shape ``(batch_size,)``.
Nothing depends on argument names, and regularisation is not part of it (see ``hvp.make_hvp``).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax

Params = Any  # a pytree of jax.Array
Batch = Mapping[str, jax.Array]
PerExampleLoss = Callable[[Params, Batch], jax.Array]
