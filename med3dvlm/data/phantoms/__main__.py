"""``python -m med3dvlm.data.phantoms --help``"""

import sys

from med3dvlm.data.phantoms.cli import main

sys.exit(main())
