"""The import order of diffseg_hf, read from the source with `ast` (nothing is imported, so this runs in
milliseconds): every module sits in one layer of LAYERS, imports only its own layer or lower ones (top-level,
function-level and TYPE_CHECKING imports alike), the import graph has no cycle, and `diffseg_hf/remote/`
(the code that ships inside saved folders) never imports diffseg_hf. docs/ARCHITECTURE.md explains the layers."""

from __future__ import annotations

import ast
import fnmatch
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffseg_hf"
README = ROOT / "README.md"

# Low -> high. A module may import modules of its own layer or of a lower one, never of a higher one.
# Entries are dotted names below diffseg_hf, fnmatch patterns allowed; a package name means its __init__.py.
LAYERS: list[tuple[str, ...]] = [
    ("", "errors", "registries", "offline", "allocator", "remote", "remote.*"),  # leaves: registries holds names,
    # remote/ ships in folders, offline detects a missing network before a Hub call, allocator sets glibc malloc
    ("recipe",),  # the validated config; knows registries by name only (diffseg_hf.registries)
    ("data.readers", "data.transforms"),  # files on disk -> arrays; torchvision-free transforms
    ("data.segmentation",),  # labelled sets (VOC, fashion-seg) built on the readers
    ("data.sources", "data.batches"),  # the image-source registry (fashion-seg canvases included); batches
    ("data",),
    ("models.blocks", "models.unet"),
    ("models",),
    ("schedule",),  # noise schedules and samplers
    ("sampling",),  # sample(unet, scheduler): training draws its preview grids with it
    ("build", "pipeline"),  # recipe -> UNet + scheduler; pipeline folders saved and loaded
    ("checkpoints", "training"),  # checkpoint folders (safetensors + JSON + manifest), the output lock; the loop
    ("features",),  # decoder features of a trained UNet
    ("pixel_classifier", "readout*", "supervised"),  # readouts on the features; the supervised baseline
    ("evaluation.segmentation",),  # mIoU: plain metric code the segmenter reports with
    ("segmentation",),  # features + readout = a Segmenter
    ("evaluation.feature_net", "evaluation.fid", "evaluation.sample_quality", "evaluation"),  # FID of a DDPM
    ("ablation", "segment_runs", "tuning"),  # orchestration: train + FID; segment fit / eval / predict / tune
    ("export",),  # the self-contained segmentation pipeline folder
    ("model_card",),
    ("hub",),  # upload selection, push and pull
]


@cache
def modules() -> dict[str, Path]:
    """Dotted name below diffseg_hf ("" for the package itself) -> file."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Absolute dotted names (with the diffseg_hf prefix) that `node` in `module` imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        is_package = modules()[module].name == "__init__.py"
        base = [PACKAGE] + (module.split(".") if module else [])
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # `from pkg import name` imports the submodule pkg.name when there is one
    subs = [f"{target}.{a.name}" for a in node.names if _local(f"{target}.{a.name}") in modules()]
    return subs + ([target] if len(subs) < len(node.names) else [])


def _local(name: str) -> str | None:
    if name == PACKAGE:
        return ""
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else None


@cache
def imports() -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) for every import of diffseg_hf, anywhere in a file."""
    out = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out += [(module, node.lineno, t) for t in _resolve(module, node) if _local(t) is not None]
    return out


def _where(module: str, line: int, target: str) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line} -> {target}"


def layer_of(module: str) -> int | None:
    found = [i for i, layer in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in layer)]
    return found[0] if found else None


def test_every_module_has_a_layer():
    missing = [f"{PACKAGE}.{m}".rstrip(".") for m in modules() if layer_of(m) is None]
    assert not missing, f"place these modules in LAYERS of {Path(__file__).name}: {missing}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, line, target in imports():
        mine, theirs = layer_of(module), layer_of(_local(target))
        if mine is not None and theirs is not None and theirs > mine:
            bad.append(f"{_where(module, line, target)} (layer {mine} imports layer {theirs})")
    assert not bad, "imports against the layer order (move the helper down instead):\n" + "\n".join(bad)


def test_import_graph_has_no_cycle():
    graph: dict[str, dict[str, int]] = {m: {} for m in modules()}
    for module, line, target in imports():
        if _local(target) in graph and _local(target) != module:
            graph[module].setdefault(_local(target), line)
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

    def visit(module: str, stack: list[str]) -> list[str] | None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target] if target in stack else [module, target]
            if target not in state and (cycle := visit(target, stack + [target])):
                return cycle
        state[module] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start, [start])):
            hops = [_where(a, graph[a][b], f"{PACKAGE}.{b}".rstrip(".")) for a, b in zip(cycle, cycle[1:])]
            raise AssertionError("import cycle:\n" + "\n".join(hops))


def test_remote_never_imports_diffseg_hf():
    bad = [_where(m, line, t) for m, line, t in imports() if m == "remote" or m.startswith("remote.")]
    assert not bad, "diffseg_hf/remote/ ships inside saved folders and must not import diffseg_hf:\n" + "\n".join(bad)


def test_the_only_late_binding_is_the_registry_directory():
    """registries.py resolves its entries with importlib (so the recipe can name higher layers' registries);
    every entry must point at a module-level assignment, and no other module imports by string."""
    tree = ast.parse(modules()["registries"].read_text())
    table = next(n.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 and getattr(n.targets[0] if isinstance(n, ast.Assign) else n.target, "id", "") == "REGISTRIES")
    entries = [(ast.literal_eval(k), [ast.literal_eval(a) for a in v.args[:2]])
               for k, v in zip(table.keys, table.values)]
    assert entries, "REGISTRIES is empty"
    for name, (module, attribute) in entries:
        path = modules().get(_local(module))
        assert path is not None, f"registry {name!r}: no module {module}"
        defined = {getattr(t, "id", None) for n in ast.parse(path.read_text()).body
                   for t in (n.targets if isinstance(n, ast.Assign) else [getattr(n, "target", None)])}
        assert attribute in defined, f"registry {name!r}: {module} assigns no {attribute} at module level"
    late = [f"{path.relative_to(ROOT)}:{node.lineno}" for m, path in modules().items() if m != "registries"
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")]
    assert not late, f"import by string outside diffseg_hf/registries.py: {late}"


# ------------------------------------------------------------------ the README names what the registries hold

def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _registry_keys(module: str, attribute: str) -> list[str]:
    """The string keys of a module-level dict literal, read with ast."""
    for node in ast.parse(modules()[module].read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if getattr(target, "id", None) == attribute and isinstance(node.value, ast.Dict):
            return [ast.literal_eval(k) for k in node.value.keys]
    raise AssertionError(f"{module}.{attribute} is not a dict literal")


def test_readme_lists_exactly_the_registered_blocks():
    listed = re.findall(r"^- `([\w-]+)`:", _readme_section("Models"), flags=re.M)
    assert sorted(listed) == sorted(_registry_keys("remote.diffseg_unet", "RESIDUAL_BLOCKS")), listed


def test_readme_lists_exactly_the_registered_data_sources():
    training = _readme_section("Training")
    paragraph = training[training.index("Data sources"):].split("\n\n")[0]
    listed = re.findall(r"`([\w-]+)(?::[A-Z]+)?` \(", paragraph) + re.findall(r"`([\w-]+):[A-Z]+`", paragraph)
    assert sorted(set(listed)) == sorted(_registry_keys("data.sources", "IMAGE_SOURCES")), listed
