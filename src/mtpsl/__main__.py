"""``python -m mtpsl`` is the ``mtpsl`` command."""

import sys

from mtpsl.cli.app import main

sys.exit(main())
