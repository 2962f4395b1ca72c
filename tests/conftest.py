"""Test-wide settings: the sha256 cache goes to a private temporary folder, never the user's ~/.cache."""

import os
import tempfile

os.environ["UNETKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="unetkit-test-cache-")
