"""README.md's Python examples, executed against what `bitserve serve` serves (the default config).

Each ```python block runs as written, with `localhost:50051` replaced by the test server's address
(and `localhost:8080`, the OpenAI-compatible HTTP port the README configures, by its HTTP port).
Where a bare expression is followed by a comment line holding a Python literal (`# 'Paris.'`,
`# [('positive', 0.667)]`), the expression's value must equal it (numbers to the shown precision).
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _shown_outputs(block: str) -> list[tuple[int, object]]:
    """(line number of an expression statement, the literal shown in the comment line after it)."""
    lines = block.splitlines()
    shown = []
    for node in ast.walk(ast.parse(block)):
        if (
            isinstance(node, ast.Expr)
            and not isinstance(node.value, ast.Constant)
            and not _is_print(node.value)
        ):
            after = lines[node.end_lineno] if node.end_lineno < len(lines) else ""
            comment = after.strip()
            if comment.startswith("#"):
                with contextlib.suppress(ValueError, SyntaxError):
                    shown.append((node.lineno, ast.literal_eval(comment[1:].strip())))
    return shown


def _is_print(value: ast.expr) -> bool:
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "print"


def _same(got, shown) -> bool:
    if isinstance(shown, float) and isinstance(got, int | float):
        digits = len(repr(shown).split(".")[1]) if "." in repr(shown) else 0
        return abs(got - shown) <= 1.5 * 10**-digits
    if isinstance(shown, list | tuple) and isinstance(got, list | tuple):
        return len(got) == len(shown) and all(_same(g, s) for g, s in zip(got, shown))
    return got == shown


class _Recorder(ast.NodeTransformer):
    """Rewrites `expr` statements on the given lines into `_record(lineno, expr)`."""

    def __init__(self, linenos: set[int]):
        self.linenos = linenos

    def visit_Expr(self, node: ast.Expr):
        if node.lineno not in self.linenos:
            return node
        call = ast.Call(
            func=ast.Name("_record", ast.Load()), args=[ast.Constant(node.lineno), node.value], keywords=[]
        )
        return ast.copy_location(ast.Expr(call), node)


def test_readme_has_python_examples_with_shown_outputs():
    blocks = _python_blocks()
    assert len(blocks) >= 2 and sum(len(_shown_outputs(b)) for b in blocks) >= 4


@pytest.mark.demo
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs_and_shows_what_it_prints(demo_server, index):
    block = _python_blocks()[index].replace("localhost:50051", demo_server.target)
    block = block.replace("localhost:8080", f"127.0.0.1:{demo_server.openai_port}")
    shown = dict(_shown_outputs(block))
    tree = ast.fix_missing_locations(_Recorder(set(shown)).visit(ast.parse(block)))
    recorded: dict[int, object] = {}
    namespace = {"_record": lambda lineno, value: recorded.__setitem__(lineno, value)}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(tree, f"README.md python block {index}", "exec"), namespace)
    assert set(recorded) == set(shown)
    wrong = {n: (recorded[n], v) for n, v in shown.items() if not _same(recorded[n], v)}
    assert not wrong, f"README shows other outputs than the server gives (line: (got, shown)): {wrong}"


def test_shown_outputs_are_read_and_compared_to_the_shown_precision():
    block = "x = 1\nx + 1\n# 2\nprint(x)\n# 5\n[('a', 0.6071)]\n# [('a', 0.607)]\nx\n# not a literal\n"
    assert _shown_outputs(block) == [(2, 2), (6, [("a", 0.607)])]
    assert _same([("a", 0.6071)], [("a", 0.607)]) and _same(("a", 0.6071), ["a", 0.607])
    assert not _same([("a", 0.62)], [("a", 0.607)]) and not _same([("b", 0.607)], [("a", 0.607)])
    assert not _same("Paris", "London") and not _same([1, 2], [1])
