"""Ship the model's own source code inside every checkpoint, for ``trust_remote_code`` loading.

transformers loads a custom architecture from a checkpoint folder by importing the files that ``config.auto_map``
names (``configuration_memoryformer.py``, ``modeling_memoryformer.py``) as one flat package, together with the
files they import *relatively* (``from .x import y``). Absolute imports must be installed packages, and the
loaded code must not need ``memoryformer`` at all (lm-eval's CLI, any Hugging Face user).

So at save time this module writes a flat bundle generated from the package's own source, never a second
hand-kept copy: starting from the two entry files it follows every ``from memoryformer.a.b import ...``,
copies each module once as ``memoryformer_a_b.py`` and rewrites the import into
``from .memoryformer_a_b import ...``. Two package modules are not bundled but replaced by stubs: the fused CPU operator
(compiled from C++ sources of the package) and the Triton kernels. In a bundle, their ``*_available()`` report
False, so ``lookup_backend="auto"`` resolves to the portable ``embedding_bag`` lookup, and an explicit ``"cpu"``
or ``"triton"`` backend runs on ``embedding_bag`` too (same contract, same numbers up to float rounding).

The module is itself bundled (the modeling code calls it from ``save_pretrained``); inside a bundle it copies
the bundle's files as they are, so a checkpoint re-saved from remote code is again loadable.
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from pathlib import Path

PACKAGE = "memoryformer"
ENTRY_MODULES = (f"{PACKAGE}.models.configuration_memoryformer", f"{PACKAGE}.models.modeling_memoryformer")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

_STUB_FALLBACK = '''"""Stand-in for ``{module}``, which checkpoints do not ship ({why}).

Without the ``memoryformer`` package the lookup runs on the portable ``embedding_bag`` backend: same contract and,
up to float rounding, the same numbers. Load the checkpoint through the package to use {what}.
"""

from .memoryformer_kernels_embedding_bag import memory_lookup_embedding_bag as {lookup}


def {available}() -> bool:
    return False
'''

STUBS: dict[str, str] = {
    f"{PACKAGE}.kernels.cpu": _STUB_FALLBACK.format(
        module=f"{PACKAGE}.kernels.cpu",
        why="it compiles C++ sources of the package",
        what="the fused CPU operators",
        lookup="memory_lookup_cpu",
        available="cpu_kernel_available",
    )
    + """

def memory_block_decode_cpu(*arguments):
    raise RuntimeError("the fused block decode is not shipped in checkpoints; load the model through memoryformer")
""",
    f"{PACKAGE}.kernels.triton": _STUB_FALLBACK.format(
        module=f"{PACKAGE}.kernels.triton",
        why="the fused Triton kernels live in the package",
        what="the Triton kernels",
        lookup="memory_lookup_triton",
        available="triton_available",
    ),
}

_IMPORT_HEAD = re.compile(rf"^(\s*)from\s+{PACKAGE}(?:\.[\w.]+)?\s+import\b")


def bundle_file_name(module: str) -> str:
    """``memoryformer.layers.hashing`` → ``memoryformer_layers_hashing.py``; the entry modules keep their names.

    The prefix keeps bundled files from shadowing real packages (``kernels``, say) when the checkpoint folder is
    the working directory.
    """
    if module in ENTRY_MODULES:
        return module.rsplit(".", 1)[-1] + ".py"
    return module.replace(".", "_") + ".py"


def _module_path(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    for path in (PACKAGE_ROOT / relative.with_suffix(".py"), PACKAGE_ROOT / relative / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"cannot bundle {module}: no source file under {PACKAGE_ROOT}")


def _package_imports(tree: ast.Module, source_name: str) -> list[ast.ImportFrom]:
    """Every ``from memoryformer... import`` in a module (at any depth), refusing forms the rewrite cannot handle."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{source_name}:{node.lineno}: write `from {PACKAGE}.x import y` so it can be bundled")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{source_name}:{node.lineno}: use absolute `from {PACKAGE}.x import y` in the package")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            if node.module == PACKAGE:
                raise ValueError(f"{source_name}:{node.lineno}: import from a submodule, not the package root")
            found.append(node)
    return found


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def bundle_sources() -> dict[str, str]:
    """File name → source text of the flat bundle: the entry modules and everything they import, rewritten."""
    sources: dict[str, str] = {}
    owners: dict[str, str] = {}  # bundle file name → package module, to catch two modules flattening alike
    pending = list(ENTRY_MODULES)
    while pending:
        module = pending.pop()
        name = bundle_file_name(module)
        if owners.setdefault(name, module) != module:
            raise ValueError(f"{module} and {owners[name]} would both be bundled as {name}; rename one")
        if name in sources:
            continue
        if module in STUBS:
            sources[name] = STUBS[module]
            continue
        text = _module_path(module).read_text(encoding="utf-8")
        tree = ast.parse(text, filename=name)
        lines = text.splitlines(keepends=True)
        for node in _package_imports(tree, module):
            if node.module in STUBS:
                missing = {a.name for a in node.names} - _defined_names(ast.parse(STUBS[node.module]))
                if missing:
                    raise ValueError(f"{module} imports {sorted(missing)} from {node.module}; add them to its stub")
            flat = bundle_file_name(node.module).removesuffix(".py")
            lines[node.lineno - 1] = _IMPORT_HEAD.sub(rf"\1from .{flat} import", lines[node.lineno - 1], count=1)
            pending.append(node.module)
        sources[name] = "".join(lines)
    _check_closed(sources)
    return sources


def _check_closed(sources: dict[str, str]) -> None:
    """Every relative import of the bundle names a bundled file (what transformers' loader will require)."""
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level and f"{node.module}.py" not in sources:
                raise ValueError(f"bundled {name} imports .{node.module}, which is not in the bundle")


def _bundle_in_place() -> dict[str, str]:
    """Inside an exported bundle: its files, as they are."""
    here = Path(__file__).resolve().parent
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(here.glob("*.py")) if p.name != "__init__.py"}


def write_remote_code(save_directory: str | os.PathLike) -> list[Path]:
    """Write the bundle into ``save_directory`` (each file atomically); returns the written paths."""
    sources = bundle_sources() if __name__ == f"{PACKAGE}.models.export" else _bundle_in_place()
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in sources.items():
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False) as f:
            f.write(text)
        os.replace(f.name, directory / name)
        written.append(directory / name)
    return written


__all__ = ["bundle_file_name", "bundle_sources", "write_remote_code"]
