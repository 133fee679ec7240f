"""The layer rule of README's "How it is built", read from the code: every import of harness/, baselines/ and tools/
(module-level, function-local and lazy alike) goes to its own layer or one below it, and the harness never imports
tools/. No module of harness/ is over 400 lines.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (its own included). Bottom to top: core (with the KD baseline it finds by name),
# plan, bench, report, run; `harness.reproduce` is the user's command over run.
MAY_IMPORT = {
    "core": {"core", "baselines"},
    "baselines": {"core", "baselines"},
    "plan": {"core", "plan", "recipes"},
    "bench": {"core", "plan", "bench"},
    "report": {"core", "plan", "bench", "report", "recipes"},
    "run": {"core", "plan", "bench", "report", "run", "recipes"},
    "command": {"run"},
    "recipes": set(),
    "tools": {"core", "plan", "bench", "report", "run", "recipes", "tools"},
}
MAX_LINES = 400


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "harness":
        if len(parts) == 1 or parts[1] == "reproduce":
            return "command"
        return parts[1]
    return parts[0]


def modules():
    for folder in ("harness", "baselines", "tools", "recipes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            yield ".".join(p for p in rel.parts if p != "__init__"), path


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy" and node.args \
                and isinstance(node.args[0], ast.Constant):  # harness.core.lazy: an import on first use
            yield node.args[0].value


def test_every_import_goes_to_its_own_layer_or_below():
    wrong = []
    for module, path in modules():
        here = layer_of(module)
        for target in imports(path):
            top = target.split(".")[0]
            if top not in ("harness", "baselines", "tools", "recipes"):
                continue
            there = layer_of(target)
            if there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layer rule:\n" + "\n".join(wrong)


def test_the_layers_are_folders():
    assert {layer_of(m) for m, _ in modules() if m.startswith("harness.")} == \
        {"command", "core", "plan", "bench", "report", "run"}


@pytest.mark.parametrize("module,path", [(m, p) for m, p in modules() if m.startswith("harness")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_no_harness_module_is_over_400_lines(module, path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_LINES})"


def test_the_rule_catches_an_import_from_above(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from harness.run.cli import main\n\n\nreport = lazy('harness.report.markdown')\n")
    assert sorted(layer_of(t) for t in imports(bad)) == ["report", "run"]
    assert not {"report", "run"} & MAY_IMPORT["core"]
