r"""The arnoldi job (pipeline/arnoldi.py).

python -m jobs.arnoldi --config=configs/mnist.py --workdir=workdirs/mnist
"""

from pipeline import cli

if __name__ == "__main__":
    cli.main(["pipeline.arnoldi"])
