"""``python -m homenet`` runs the ``homenet`` command."""

import sys

from homenet.cli.main import main

sys.exit(main())
