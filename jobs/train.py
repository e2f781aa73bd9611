r"""The train job (stages/train.py).

python -m jobs.train --config=configs/mnist.py --workdir=workdirs/mnist
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.train"])
