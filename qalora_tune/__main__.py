"""``python -m qalora_tune``: same as the ``qalora-tune`` command."""

import sys

from qalora_tune._cli import main

sys.exit(main())
