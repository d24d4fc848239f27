"""`python -m smoe VERB ...` (and later `torchrun ... -m smoe VERB`): the smoe command."""

import sys

from smoe.cli import main

sys.exit(main())
