"""``python -m controlplane`` is the ``runner-pool`` command."""
import sys

from controlplane.cli import main

sys.exit(main())
