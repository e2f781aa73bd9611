r"""The score job (stages/score.py).

python -m jobs.score --config=configs/mnist.py --workdir=workdirs/mnist
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.score"])
