"""``python -m mtpsl`` is the ``mtpsl`` command."""

import sys

from .cli import main

sys.exit(main())
