r"""The fit job (stages/fit.py): the configured method's artifact, e.g.

python -m jobs.fit --config=configs/mnist.py --workdir=workdirs/mnist --config.method.name=randproj
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.fit"])
