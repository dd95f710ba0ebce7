"""``python -m reconciler.responder``: run the DNS responder process."""

import sys

from reconciler.responder.server import main

sys.exit(main())
