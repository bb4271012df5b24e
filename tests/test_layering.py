"""The import graph respects the layers: kernels < diffusion/checkpoint/quantize < engines.

Every import statement (module level or inside functions, absolute or relative) of the lower layers is
read from the source, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package dir -> (its module name, module prefixes it must never import)
ENGINES = ("vllm", "sglang", "nvfp4_ext.engines")
LAYERS = {
    "kernels": (
        "nvfp4_ext.kernels",
        ("nvfp4_ext.diffusion", "nvfp4_ext.checkpoint", "nvfp4_ext.quantize", "nvfp4_ext.cli", *ENGINES),
    ),
    "nvfp4_ext/diffusion": ("nvfp4_ext.diffusion", ENGINES),
    "nvfp4_ext/checkpoint": ("nvfp4_ext.checkpoint", ENGINES),
    "nvfp4_ext/quantize": ("nvfp4_ext.quantize", ENGINES),
}


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_do_not_import_upper_ones(layer: str) -> None:
    package, forbidden = LAYERS[layer]
    files = sorted((ROOT / layer).glob("*.py"))
    assert files, f"no sources under {layer}"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in _imports(path, package)
        if any(module == prefix or module.startswith(prefix + ".") for prefix in forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_import_scanner_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..diffusion.stats import x\n    import vllm.config\n")
    modules = [module for _, module in _imports(source, "nvfp4_ext.kernels")]
    assert "nvfp4_ext.diffusion.stats" in modules and "vllm.config" in modules


def test_denoise_kernel_module_loads_without_the_diffusion_package() -> None:
    pytest.importorskip("triton")
    code = (
        "import sys, nvfp4_ext.kernels.denoise_stats; "
        "bad = [m for m in sys.modules if m.startswith(('nvfp4_ext.diffusion', 'nvfp4_ext.engines'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
