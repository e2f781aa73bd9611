r"""The report job (stages/report.py): the methods side by side on the current task.

python -m jobs.report --config=configs/mnist.py:runlocal --workdir=workdirs/report
"""

from jobs import cli

if __name__ == "__main__":
    cli.main(["stages.report"])
