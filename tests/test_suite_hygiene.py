"""The test suite's own rules, read from its source (AST, nothing is run):

* a test that starts ranks (``helpers.run_ranks``, ``torch.multiprocessing`` spawns, a
  torchrun / deepspeed launcher) is marked ``@pytest.mark.distributed``, so ``-m "not
  distributed"`` really runs in one process;
* a reference package is skipped inside the tests that need it, never at module level (which
  would skip every other test of the file); only Flower may, since its file is all-Flower.
"""

from __future__ import annotations

import ast
import pathlib


TESTS = pathlib.Path(__file__).parent
HELPER_MODULES = ("helpers.py", "trainer_setup.py")
MODULE_LEVEL_SKIP_ALLOWED = ("flwr",)

# Calls that start processes themselves: torch.multiprocessing's spawn / start_processes
# (any spelling: mp.spawn, torch.multiprocessing.spawn, ...).
_PROCESS_STARTERS = {"spawn", "start_processes"}
# Launchers that start ranks, as they appear in a command list.
_LAUNCHER_STRINGS = {"torch.distributed.run", "torchrun"}


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _starts_ranks_directly(fn: ast.AST, spawners: set[str]) -> bool:
    """Whether ``fn``'s body calls a rank spawner, passes a non-None ``launcher=`` (the CLI
    helpers run the command under it), or builds a torchrun / deepspeed launcher command."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            if _call_name(node) in spawners:
                return True
            for kw in node.keywords:
                if kw.arg == "launcher" and not (isinstance(kw.value, ast.Constant) and kw.value.value is None):
                    return True
        if isinstance(node, ast.Constant) and node.value in _LAUNCHER_STRINGS:
            return True
        if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant) \
                and node.elts[0].value == "deepspeed":
            return True
    return False


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def helper_spawners() -> set[str]:
    """Names of the shared helpers (tests/helpers.py, tests/trainer_setup.py) that start ranks."""
    names = set(_PROCESS_STARTERS)
    for module in HELPER_MODULES:
        tree = ast.parse((TESTS / module).read_text())
        for name, fn in _functions(tree).items():
            if _starts_ranks_directly(fn, _PROCESS_STARTERS):
                names.add(name)
    return names


def _is_distributed_mark(dec: ast.AST) -> bool:
    # @pytest.mark.distributed (also as pytest.mark.distributed(...))
    target = dec.func if isinstance(dec, ast.Call) else dec
    return isinstance(target, ast.Attribute) and target.attr == "distributed"


def unmarked_rank_tests(source: str, spawners: set[str]) -> list[str]:
    """Test functions of ``source`` that start ranks -- themselves, through a module-level
    helper, or through a fixture they request -- without ``@pytest.mark.distributed``."""
    tree = ast.parse(source)
    module_marked = any(
        isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
        and any(_is_distributed_mark(m) for m in ast.walk(n.value)) for n in tree.body)
    funcs = _functions(tree)
    spawning = set(spawners)
    changed = True
    while changed:  # module-level helpers and fixtures that reach a spawner, to a fixed point
        changed = False
        for name, fn in funcs.items():
            if name not in spawning and _starts_ranks_directly(fn, spawning):
                spawning.add(name)
                changed = True
    bad = []
    for name, fn in funcs.items():
        if not name.startswith("test"):
            continue
        uses_fixture = any(a.arg in spawning for a in fn.args.args)
        if (name in spawning or uses_fixture) and not module_marked \
                and not any(_is_distributed_mark(d) for d in fn.decorator_list):
            bad.append(name)
    return bad


def module_level_importorskips(source: str) -> list[str]:
    """Packages skipped with ``pytest.importorskip`` outside any function or class of ``source``."""
    tree = ast.parse(source)
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return  # runs only when called: that is where the skip belongs
        if isinstance(node, ast.Call) and _call_name(node) == "importorskip" and node.args:
            arg = node.args[0]
            found.append(arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _test_modules() -> list[pathlib.Path]:
    return sorted(TESTS.glob("test_*.py"))


# ---------------------------------------------------------------------------- the rules
def test_every_test_that_starts_ranks_is_marked_distributed():
    spawners = helper_spawners()
    assert "run_ranks" in spawners  # the scan sees the shared helper (else it checks nothing)
    bad = {p.name: unmarked_rank_tests(p.read_text(), spawners) for p in _test_modules()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"add @pytest.mark.distributed to: {bad}"


def test_no_module_level_importorskip_of_a_reference_package():
    bad = {}
    for p in _test_modules():
        skips = [s for s in module_level_importorskips(p.read_text())
                 if s.split(".")[0] not in MODULE_LEVEL_SKIP_ALLOWED]
        if skips:
            bad[p.name] = skips
    assert not bad, f"move these pytest.importorskip calls into the tests that need them: {bad}"


# ---------------------------------------------------------------------------- the scanners can fail
SAMPLE = '''
import pytest
import torch.multiprocessing as mp
from helpers import run_ranks
from trainer_setup import run_cli

ref = pytest.importorskip("galore_torch")

def _helper():
    return run_ranks(f, 2)

@pytest.fixture
def ranks():
    return _helper()

def test_direct():
    run_ranks(f, 2)

def test_through_helper():
    _helper()

def test_through_fixture(ranks):
    pass

def test_spawn():
    mp.spawn(f, nprocs=2)

def test_torchrun():
    launcher = ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run_cli([], ".", launcher=launcher)

def test_deepspeed():
    run_cli([], ".", launcher=["deepspeed", "--num_gpus", "2"])

@pytest.mark.distributed
def test_marked():
    run_ranks(f, 2)

def test_single_process():
    run_cli([], ".", launcher=None)
    pytest.importorskip("bitsandbytes")
'''


def test_scanners_find_unmarked_rank_tests_and_module_level_skips():
    bad = unmarked_rank_tests(SAMPLE, helper_spawners())
    assert bad == ["test_direct", "test_through_helper", "test_through_fixture", "test_spawn", "test_torchrun",
                   "test_deepspeed"]
    marked_module = "import pytest\npytestmark = [pytest.mark.distributed]\n" + SAMPLE
    assert unmarked_rank_tests(marked_module, helper_spawners()) == []
    assert module_level_importorskips(SAMPLE) == ["galore_torch"]

