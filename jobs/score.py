r"""The score job (pipeline/score.py).

python -m jobs.score --config=configs/mnist.py --workdir=workdirs/mnist
"""

from pipeline import cli

if __name__ == "__main__":
    cli.main(["pipeline.score"])
