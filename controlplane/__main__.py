"""``python -m controlplane`` is the ``runner-pool`` command."""
from controlplane.cli import entry

entry()
