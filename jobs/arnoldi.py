r"""The arnoldi job: an alias of the fit job (stages/fit.py), the name the paper's users know.

python -m jobs.arnoldi --config=configs/mnist.py --workdir=workdirs/mnist
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.fit"])
