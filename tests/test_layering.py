"""The layers import downward only, and the daemon carries nothing it does not run.

drivers/core (the shared kernel) <- drivers/, firmware_bridge/ <- agent/ <- scripts/, tests/, bench/.
Checked on the source (every import statement, including those inside functions) and on what a
real interpreter loads for the daemon.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in _imports(path):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("folder, forbidden", [
    ("drivers", ("agent", "scripts", "tests", "firmware_bridge", "elm")),
    ("firmware_bridge", ("agent", "drivers", "scripts", "tests", "elm")),
    ("agent", ("scripts", "tests", "bench", "elm")),
])
def test_layers_import_downward_only(folder, forbidden):
    assert _violations(folder, forbidden) == []


def test_the_shared_kernel_imports_no_driver():
    bad = [v for v in _violations("drivers/core", ("drivers",)) if "drivers.core" not in v]
    assert bad == []


def test_the_daemon_loads_neither_the_cli_nor_test_tools():
    """What `dongle-agent` imports to build an agent: never the CLI, scripts/ or the
    ELM327-emulator (a non-commercial test peer), nor config/ as a top-level package."""
    code = ("import json, sys; import agent.daemon, agent.compose; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True,
                         cwd="/").stdout
    loaded = json.loads(out)
    offending = [m for m in loaded if m.split(".")[0] in ("scripts", "tests", "elm", "config")
                 or m == "agent.cli" or m.startswith("agent.cli.")]
    assert offending == []
