"""The vision workload at the paper's model sizes (Schioppa et al. 2022, §5.3, Table 6, Figure 3).

    .venv/bin/python -m benchmarks.vision --sections=memory,time,retrieval --out=workdirs/vbench

[memory] Krylov bytes per device for ResNet50 and ViT-B/32 (``--memory_models``) with n = 200 on
    a 'model' axis of 1, 2, 4, 8 fake CPU devices, from the pipeline's own layout (the task's
    params without the BatchNorm state, ``parallel/sharding.py`` with the pod preset's
    ``min_shard_size``, the basis stacked over n + 1): each leaf's shard shape as the mesh would
    hold it (nothing of that size is allocated: ResNet50's basis is 20.5 GB). Prints the bytes on
    the most loaded device, its ratio to 1 device, and k × (bytes of the sharded leaves on one
    device) / (their bytes on 1 device), which is 1.00 when they split evenly. A cross-check
    allocates the basis of ``--check_model`` at n = ``--check_iters`` through the pipeline's
    ``jit_init_krylov_state`` and compares ``sharding.bytes_per_device`` with the computed figure.
[time] Arnoldi seconds per iteration (HVP on b = ``--batch_size`` images + orthogonalisation, the
    pipeline's jitted step, compile excluded, median of ``--time_iters``) for each model of
    ``--time_models`` at its config's image size, against its parameter count: the paper's Figure 3
    shape (time linear in model size).
[retrieval] configs/vision.py (Fashion-MNIST, 10% flipped, ``--retrieval_preset``): one training
    run, Arnoldi with n = ``--num_iters`` over the full model and over the last blocks holding 20%
    of the parameters (``params.last_fraction=0.2``), then for p̃ in ``--top_ks`` and |λ| against
    ``distill.positive_only``: distill, score, evaluate. Prints AUC/AP per row, the negative share
    of the top-p̃ |λ| mass, and the wall time of each stage; writes ``<out>/vision.json``.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

# [memory] lays out meshes of up to 8 fake devices; [time] runs in its own process on 1 device
# (fake devices share the cores), started by main() when both are asked for.
TIME_ONLY = any(a in ("--sections=time", "--sections=retrieval") for a in sys.argv)
jax.config.update("jax_num_cpu_devices", 1 if TIME_ONLY else 8)

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import vision as vision_config  # noqa: E402
from influence.hvp import make_hvp  # noqa: E402
from influence.selection import Selection  # noqa: E402
from methods.arnoldi import KRYLOV  # noqa: E402
from parallel import programs, sharding  # noqa: E402
from parallel.mesh import make_mesh  # noqa: E402
from runtime import workdir as wd  # noqa: E402
from tasks import vision  # noqa: E402

_SECTIONS = flags.DEFINE_list("sections", ["memory", "time"], "memory, time, retrieval.")
_OUT = flags.DEFINE_string("out", "workdirs/vision_benchmark", "Workdirs of [retrieval].")
_MEMORY_MODELS = flags.DEFINE_list("memory_models", ["resnet50", "vit_b32"], "Models of [memory].")
_MEMORY_ITERS = flags.DEFINE_integer("memory_iters", 200, "n of [memory].")
_CHECK_MODEL = flags.DEFINE_string("check_model", "resnet18", "Model allocated in [memory].")
_CHECK_ITERS = flags.DEFINE_integer("check_iters", 4, "n of the allocated cross-check.")
_TIME_MODELS = flags.DEFINE_list(
    "time_models",
    ["resnet_tiny", "vit_tiny", "resnet_small", "vit_small", "vit_ti16", "resnet18", "resnet50"],
    "Models of [time].",
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "HVP batch of [time].")
_TIME_ITERS = flags.DEFINE_integer("time_iters", 5, "Timed Arnoldi iterations per model in [time].")
_PRESET = flags.DEFINE_string("retrieval_preset", "", "configs/vision.py presets of [retrieval].")
_NUM_ITERS = flags.DEFINE_integer("num_iters", 200, "Arnoldi n of [retrieval] (the paper's).")
_TOP_KS = flags.DEFINE_list("top_ks", ["10", "100"], "p̃ values of [retrieval].")
_NUM_EVAL = flags.DEFINE_integer(
    "num_eval", -1, "data.num_eval of [retrieval] (-1: the config's); the eval split is scored too."
)
_DEVICES = (1, 2, 4, 8)


def params_shapes(model: str):
    """(the config, the task's params ShapeDtypeStructs, the selection influence covers) for a
    model preset of configs/vision.py at 1,000 classes (ImageNet), built without any data."""
    config = vision_config.get_config(f"pod,model={model}")
    classifier = vision.Classifier(
        vision.make_model(model, 1000), (config.data.image_size,) * 2 + (3,)
    )
    shapes = jax.eval_shape(classifier.init_params, jax.random.key(0))
    return config, shapes, Selection.build(shapes, state=classifier.state)


def krylov_bytes(vectors, mesh, min_shard_size: int, num_iters: int) -> list[tuple[int, bool]]:
    """Per leaf of the (n + 1)-stacked basis: (bytes on one device, whether it is split over
    'model'), from the leaf's shard shape under the pipeline's shardings."""
    basis_sh = sharding.stacked_shardings(sharding.param_shardings(vectors, mesh, min_shard_size))
    leaves = []
    for leaf, sh in zip(jax.tree.leaves(vectors), jax.tree.leaves(basis_sh), strict=True):
        shape = (num_iters + 1, *leaf.shape)
        nbytes = int(np.prod(sh.shard_shape(shape))) * leaf.dtype.itemsize
        leaves.append((nbytes, any(axis is not None for axis in sh.spec)))
    return leaves


def memory() -> dict:
    print(f"\n[memory] Krylov basis bytes per device, n = {_MEMORY_ITERS.value}, 'model' axis of k")
    results = {}
    for model in _MEMORY_MODELS.value:
        config, shapes, selection = params_shapes(model)
        vectors = selection.select(shapes)
        num = sum(x.size for x in jax.tree.leaves(vectors))
        rows, one = [], None
        for k in _DEVICES:
            mesh = make_mesh(1, k, k, 1)
            leaves = krylov_bytes(vectors, mesh, config.mesh.min_shard_size, _MEMORY_ITERS.value)
            one = one or [b for b, _ in leaves]
            total = sum(b for b, _ in leaves)
            split = [i for i, (_, s) in enumerate(leaves) if s]
            sharded = sum(leaves[i][0] for i in split)
            rows.append(
                {
                    "devices": k,
                    "bytes": total,
                    "ratio": total / sum(one),
                    "sharded_ratio_times_k": k * sharded / sum(one[i] for i in split)
                    if split
                    else 1.0,
                    "sharded_fraction": sum(one[i] for i in split) / sum(one) if split else 0.0,
                    "replicated_bytes": total - sharded,
                }
            )
        print(f"  {model}: {num:,} params (influence over {selection.describe(shapes)})")
        for r in rows:
            print(
                f"    k={r['devices']}: {r['bytes'] / 2**30:7.3f} GiB on the most loaded device, "
                f"ratio to 1 device {r['ratio']:.4f} (1/k = {1 / r['devices']:.4f}); sharded "
                f"leaves ({100 * r['sharded_fraction']:.1f}% of the basis): k x ratio = "
                f"{r['sharded_ratio_times_k']:.4f}; replicated {r['replicated_bytes'] / 2**20:.1f} MiB"
            )
        results[model] = rows
    # Cross-check: allocate a basis through the pipeline and measure its shards.
    config, shapes, selection = params_shapes(_CHECK_MODEL.value)
    vectors = selection.select(shapes)
    for k in (1, 8):
        mesh = make_mesh(1, k, k, 1)
        vector_sh = sharding.param_shardings(vectors, mesh, config.mesh.min_shard_size)
        init = programs.jit_init_krylov_state(vectors, _CHECK_ITERS.value, vector_sh, mesh)
        state = init(jax.random.key(0))
        measured = sharding.bytes_per_device(state["krylov_basis"])
        computed = sum(
            b
            for b, _ in krylov_bytes(vectors, mesh, config.mesh.min_shard_size, _CHECK_ITERS.value)
        )
        print(
            f"  check {_CHECK_MODEL.value}, n={_CHECK_ITERS.value}, k={k}: allocated "
            f"{measured / 2**20:.1f} MiB per device, computed {computed / 2**20:.1f} MiB"
        )
        assert measured == computed, (measured, computed)
        del state
    return results


def time_models() -> list[dict]:
    print(f"\n[time] Arnoldi s/iteration, b = {_BATCH.value} images, 1 CPU device (2 cores)")
    rows = []
    mesh = make_mesh(1, 1, 1, 1)
    for model in _TIME_MODELS.value:
        config = vision_config.get_config(f"model={model}")
        size = config.data.image_size
        classifier = vision.Classifier(vision.make_model(model, 10), (size, size, 1))
        params = classifier.init_params(jax.random.key(0))
        selection = Selection.build(params, state=classifier.state)
        vectors = selection.select(params)
        num = sum(x.size for x in jax.tree.leaves(vectors))
        rng = np.random.default_rng(0)
        batch = {
            "image": rng.normal(size=(_BATCH.value, size, size, 1)).astype(np.float32),
            "label": rng.integers(0, 10, _BATCH.value).astype(np.int32),
        }
        hvp = make_hvp(classifier.per_example_loss, config.l2, selection)
        param_sh = sharding.param_shardings(params, mesh, config.mesh.min_shard_size)
        vector_sh = selection.select(param_sh)
        iters = _TIME_ITERS.value + 1
        init = programs.jit_init_krylov_state(vectors, iters, vector_sh, mesh)
        a = config.arnoldi
        step = programs.jit_arnoldi_step(
            hvp, param_sh, vector_sh, mesh, a.breakdown_tol, a.orthogonalization
        )
        state = init(jax.random.key(1))
        times = []
        for i in range(iters):
            start = time.perf_counter()
            state, _ = step(state, params, batch, np.int32(i))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times[1:]))
        rows.append({"model": model, "params": int(num), "image_size": size, "s_per_iter": seconds})
        print(
            f"  {model:13s} {num:>12,} params, {size}px: {seconds:8.3f} s/iteration "
            f"({seconds / num * 1e6:.3f} µs per param)"
        )
        del state
    return rows


def _seeded(source: epath.Path, target: epath.Path, method: str, krylov: bool) -> None:
    """Make ``target`` a workdir holding ``source``'s trained params and, with ``krylov``, the
    method's Krylov state (``methods/<method>/krylov``); nothing when it already holds them."""
    done = wd.results(target, method) / KRYLOV if krylov else target / wd.PARAMS
    if done.exists():
        return
    wd.claim(target)  # a new workdir of this layout (its layout.json)
    if not (target / wd.PARAMS).exists():
        shutil.copytree(source / wd.PARAMS, target / wd.PARAMS)
    if krylov:
        shutil.copytree(wd.results(source, method) / KRYLOV, done)


def _variant(config, workdir: epath.Path, name: str, times: dict[str, float]) -> dict:
    """Distil (the Krylov state is complete), score and evaluate one run of [retrieval]; its row."""
    from methods import registry
    from stages import evaluate, fit, score

    start = time.perf_counter()
    fit.run(config, workdir)  # the Krylov state is complete: distils only
    score.run(config, workdir)
    evaluate.run(config, workdir)
    t_score = time.perf_counter() - start
    results = wd.results(workdir, registry.of(config).name)
    metrics = json.loads((results / wd.METRICS_JSON).read_text())
    summary = json.loads((results / wd.FIT_JSON).read_text())
    print(
        f"  {name:18s} AUC {metrics['auc']:.3f} AP {metrics['ap']:.3f}  negative "
        f"|λ| mass {100 * summary['negative_mass_fraction']:.1f}%  "
        f"({summary['influence_over']}; distil+score+evaluate {t_score:.0f} s)",
        flush=True,
    )
    return {
        "run": name,
        "influence_over": summary["influence_over"],
        "top_k": config.distill.top_k,
        "positive_only": config.distill.positive_only,
        "auc": metrics["auc"],
        "ap": metrics["ap"],
        "negative_mass_fraction": summary["negative_mass_fraction"],
        **times,
        "distill_score_evaluate_s": t_score,
    }


def _subset(base_config, out: epath.Path, subset: str, fraction: float, t_train: float):
    """Arnoldi over the leaves of ``params.last_fraction=fraction`` (in ``<out>/<subset>-krylov``)
    and the rows of its runs, one per p̃ of ``--top_ks`` and |λ| or ``distill.positive_only``."""
    from methods import registry
    from stages import fit

    krylov_dir = out / f"{subset}-krylov"
    config = base_config.copy_and_resolve_references()
    config.params.last_fraction = fraction
    config.distill.top_k = min(int(k) for k in _TOP_KS.value)
    method = registry.of(config).name
    _seeded(out / "trained", krylov_dir, method, krylov=False)
    start = time.perf_counter()
    fit.run(config, krylov_dir)
    times = {"train_s": t_train, "arnoldi_s": time.perf_counter() - start}
    rows = []
    for top_k in (int(k) for k in _TOP_KS.value):
        for positive in (False, True):
            name = f"{subset}-p{top_k}-{'pos' if positive else 'abs'}"
            _seeded(krylov_dir, out / name, method, krylov=True)
            config.distill.top_k, config.distill.positive_only = top_k, positive
            rows.append(_variant(config, out / name, name, times))
    return rows


def retrieval() -> list[dict]:
    from stages import train

    out = epath.Path(_OUT.value).resolve()
    base_config = vision_config.get_config(_PRESET.value or None)
    base_config.arnoldi.num_iters = _NUM_ITERS.value
    if _NUM_EVAL.value >= 0:
        base_config.data.num_eval = _NUM_EVAL.value
    base_config.log_every_secs = 60.0
    start = time.perf_counter()
    train.run(base_config, out / "trained")
    t_train = time.perf_counter() - start
    rows = []
    for subset, fraction in (("full", 0.0), ("top20", 0.2)):
        rows += _subset(base_config, out, subset, fraction, t_train)
    print(
        f"  train {t_train:.0f} s; Arnoldi n={_NUM_ITERS.value}: "
        + ", ".join(
            f"{r['run'].split('-')[0]} {r['arnoldi_s']:.0f} s"
            for r in rows[:: 2 * len(_TOP_KS.value)]
        )
    )
    (out / "vision.json").write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = set(_SECTIONS.value) - {"memory", "time", "retrieval"}
    if unknown:
        raise app.UsageError(f"unknown sections {sorted(unknown)}")
    if "memory" in _SECTIONS.value:
        memory()
    for section, run in (("time", time_models), ("retrieval", retrieval)):
        if section not in _SECTIONS.value:
            continue
        if TIME_ONLY:
            run()
        else:  # on 1 device, in a process of its own
            others = [a for a in sys.argv[1:] if not a.startswith("--sections")]
            command = [sys.executable, "-m", "benchmarks.vision", f"--sections={section}", *others]
            subprocess.run(command, cwd=REPO, check=True)


if __name__ == "__main__":
    app.run(main)
