"""Container healthcheck: the server's /health on loopback inside the container answers 200."""

import os
import sys
import urllib.request

port = os.environ.get("MOA_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
