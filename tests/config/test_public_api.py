from __future__ import annotations

import subprocess
import sys
import types

import sidegate.config
from sidegate.config import models


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(sidegate.config).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }

    assert set(sidegate.config.__all__) == public
    assert set(models.__all__) <= public
    assert {"ConfigError", "Problem", "load_config", "load_config_text", "config_json_schema"} <= (
        public
    )


def test_config_does_not_import_aiohttp() -> None:
    code = "import sys, sidegate.config; sys.exit('aiohttp' in sys.modules)"

    result = subprocess.run([sys.executable, "-c", code], check=False)

    assert result.returncode == 0
