r"""The fit job (pipeline/fit.py): the configured method's artifact, e.g.

python -m jobs.fit --config=configs/mnist.py --workdir=workdirs/mnist --config.method.name=randproj
"""

from pipeline import cli

if __name__ == "__main__":
    cli.main(["pipeline.fit"])
