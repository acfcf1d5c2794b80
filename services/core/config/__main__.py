"""``python -m services.core.config [--write]``: print or write configs/config.yaml."""

import sys

from services.core.config.document import main

sys.exit(main())
