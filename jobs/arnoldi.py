r"""The arnoldi job (stages/arnoldi.py).

python -m jobs.arnoldi --config=configs/mnist.py --workdir=workdirs/mnist
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.arnoldi"])
