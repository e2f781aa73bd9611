r"""The evaluate job (pipeline/evaluate.py).

python -m jobs.evaluate --config=configs/mnist.py --workdir=workdirs/mnist
"""

from pipeline import cli

if __name__ == "__main__":
    cli.main(["pipeline.evaluate"])
