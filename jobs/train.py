r"""The train job (pipeline/train.py).

python -m jobs.train --config=configs/mnist.py --workdir=workdirs/mnist
"""

from pipeline import cli

if __name__ == "__main__":
    cli.main(["pipeline.train"])
