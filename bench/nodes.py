"""scripts/brokers.py for the bench scripts (it is a script, not a package module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_brokers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("brokers", ROOT / "scripts" / "brokers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["brokers"] = module
    spec.loader.exec_module(module)
    return module
