"""The one base class of the errors a user can fix.

Input that cannot work (a config field, a dataset, a saved state from another config, a cluster
setting) raises a ``UserError`` whose message is one line saying what is wrong and how to fix it.
Every job prints that line and exits 2; the Python API raises it as it is. Any other exception is
a bug and keeps its traceback. The class sits at the bottom of the layers so that every layer can
raise it: the math (a selection pattern that matches nothing), the device layer (a mesh that does
not divide the devices), checkpoints (a saved state of another config), the runtime and above
(``runtime/errors.py``).
"""


class UserError(Exception):
    """Input the job cannot use; the message says, in one line, how to fix it."""
