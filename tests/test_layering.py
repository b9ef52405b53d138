"""The one-way dependencies of DESIGN.md, enforced.

Along a request's path (client -> server -> engine -> adapters -> model -> kernels) a package may
import the packages after it, never those before it: the model knows nothing of the engine, the
engine nothing of the server. The analysis side (results, analysis) reads files only and never
imports the engine. `config` and `kernels` sit at the bottom and import no other package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorascope

ROOT = Path(lorascope.__file__).parent

# package -> packages it may import (besides itself). Unlisted packages fail the test: add them here.
ALLOWED: dict[str, set[str]] = {
    "config": {"model"},  # validates lora_target_modules against model.config's names
    "kernels": set(),
    "model": {"kernels"},
    "adapters": {"model", "kernels", "config"},
    "engine": {"adapters", "model", "kernels", "config"},
    "reference": {"model", "config"},
    "server": {"engine", "adapters", "model", "kernels", "config"},
    "results": {"config"},
    "loadgen": {"results", "config"},
    "analysis": {"results", "loadgen", "config"},  # loadgen: the working-set model and the traffic laws
    "bench": {"adapters", "loadgen", "model", "results", "config"},
    "experiment": {"loadgen", "results", "config"},
    "sweep": {"bench", "experiment", "adapters", "loadgen", "model", "results", "analysis", "verifycmd", "config"},
    "tunecmd": {"analysis", "bench", "loadgen", "config"},
    "verify": {"reference", "model", "config"},  # the audit's logic: references, classification
    "verifycmd": {"verify", "bench", "adapters", "loadgen", "model", "config"},  # drives an engine over HTTP
    "cli": {"*"},
    "__init__": {"engine", "config"},
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorascope."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lorascope.")}
    return found


def test_every_package_has_a_rule() -> None:
    packages = {_package_of(p) for p in ROOT.rglob("*.py")}
    assert packages <= set(ALLOWED), f"add a layering rule for {sorted(packages - set(ALLOWED))}"


def test_imports_point_one_way() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        pkg = _package_of(path)
        allowed = ALLOWED[pkg]
        if "*" in allowed:
            continue
        for imported in _imports(path) - {pkg} - allowed:
            violations.append(f"{path.relative_to(ROOT)} imports lorascope.{imported}")
    assert not violations, "imports against the request's path:\n" + "\n".join(violations)


def test_the_rule_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from lorascope.engine.engine import LLMEngine\nimport lorascope.server.app\n")
    assert _imports(bad) == {"engine", "server"}
