"""The layering the code promises (STYLE.md, docs/architecture.md), checked by reading the sources: no import cycle,
no library module importing a script, train.py and eval.py naming no family and staying short."""
import ast
import io
import os
import tokenize

from tests.test_train import ROOT

SCRIPTS = ("train", "eval", "search", "ablate")  # the entry points; everything else is library
PACKAGES = ("models", "losses", "data", "kernels", "metrics", "evaluation", "recipes")
FAMILY_WORDS = ("blip", "flamingo", "siglip", "lm_", "decoder", "perceiver", "finetune", "_MODELS")


def modules() -> dict[str, str]:
    """crossmodal module name -> file, for every module of the installed package."""
    found = {name: os.path.join(ROOT, f"{name}.py") for name in
             ("config", "distributed", "parallel", "checkpointing", *SCRIPTS)}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    relative = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
                    found[relative.removesuffix(".__init__")] = os.path.join(folder, file)
    return found


def imports(path: str, name: str, known: set[str]) -> set[str]:
    """The crossmodal modules a file imports, anywhere in it (a function's lazy import counts too)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            elif base.startswith("crossmodal"):
                base = base[len("crossmodal."):] if base != "crossmodal" else ""
            else:
                continue
            targets = [f"{base}.{alias.name}".strip(".") for alias in node.names] + [base]
        for target in targets:
            target = target.removeprefix("crossmodal.")
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle_and_no_library_module_imports_a_script():
    found = modules()
    graph = {name: imports(path, name, set(found)) for name, path in found.items()}
    for name, targets in graph.items():
        if name not in SCRIPTS:
            assert not targets & set(SCRIPTS), f"library module {name} imports the script(s) {targets & set(SCRIPTS)}"
    # a package's __init__ re-exporting its own modules is the package, not a cycle
    edges = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            assert state.get(target) != 1, f"import cycle: {' -> '.join(path[path.index(target):] + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def code_names(path: str) -> list[tuple[int, str]]:
    """(line, name) of every identifier in a file's code (comments and strings left out)."""
    with open(path) as f:
        return [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(f.read()).readline)
                if token.type == tokenize.NAME]


def test_train_and_eval_name_no_family_and_stay_short():
    for script, limit in (("train.py", 300), ("eval.py", 250)):
        path = os.path.join(ROOT, script)
        family = [(line, name) for line, name in code_names(path)
                  if any(word in name.lower() for word in FAMILY_WORDS)]
        assert not family, f"{script} names a family in its code: {family}"
        lines = open(path).read().splitlines()
        assert len(lines) <= limit, f"{script} has {len(lines)} lines (at most {limit})"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 80, f"{script}: {node.name} has more than 80 lines"


def test_data_reads_no_family_key():
    for folder, _, files in os.walk(os.path.join(ROOT, "data")):
        for file in files:
            if file.endswith(".py"):
                text = open(os.path.join(folder, file)).read()
                for key in ("cfg.blip", "cfg.lm", "cfg.flamingo", "cfg.finetune", ".blip.", "model.blip_"):
                    assert key not in text.replace("# ", ""), f"data/{file} reads {key}"
