r"""The whole analysis in one process: train → fit (the method: Arnoldi by default) → score → evaluate.

  python -m jobs.pipeline --config=configs/mnist.py --workdir=workdirs/mnist

Each stage reuses results already in the workdir (after checking they come from the same config),
so re-running after a crash or a preemption continues where it stopped.
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.train", "stages.fit", "stages.score", "stages.evaluate"])
