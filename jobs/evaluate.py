r"""The evaluate job (stages/evaluate.py).

python -m jobs.evaluate --config=configs/mnist.py --workdir=workdirs/mnist
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.evaluate"])
