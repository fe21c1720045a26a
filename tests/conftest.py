import os
import tempfile
from pathlib import Path

import pytest

# Generated data sets are cached per test session, never in the user's home.
os.environ.setdefault("STALWART_CACHE", str(Path(tempfile.gettempdir()) / "stalwart-test-cache"))


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"
