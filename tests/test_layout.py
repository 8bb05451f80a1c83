"""The repository's top-level folders must not shadow installed packages: tests and
`python -m rlhf_fast.cli` run with the repository root on sys.path, where a folder named like
a dependency's module wins over the dependency (a root `kernels/` broke every transformers
import once transformers began to depend on Hugging Face's `kernels`)."""

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_folder_shadows_an_installed_module():
    installed = importlib.metadata.packages_distributions()
    # only regular packages shadow: a folder without __init__.py is a namespace portion, which
    # the import system passes over when a real package of that name comes later on sys.path
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    clashes = {name: installed[name] for name in ours & set(installed) if name != "rlhf_fast"}
    assert not clashes, f"top-level folders named like installed modules: {clashes}"


def test_triton_kernels_ship_inside_the_package():
    import rlhf_fast

    assert (Path(rlhf_fast.__file__).parent / "kernels" / "fused_linear.py").is_file()
    assert not (ROOT / "kernels").exists()
