"""The repository as a new user runs it: from its root, with today's packages installed.

``python -m pytest`` and ``python -m bench`` put the repository root first on ``sys.path`` (and pytest the tests
folder too). A folder there that is a regular package shadows any installed distribution of that import name:
the top-level ``kernels/`` did so to Hugging Face's ``kernels`` (which transformers >= 5.25 requires), and every
transformers model module failed to import. These tests fail on that layout.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository root: sys.path[0] is the root, as for ``python -m pytest``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _reachable_names() -> dict[str, str]:
    """Import names reachable from the root and the tests folder -> "regular" (a package with __init__.py or a
    module: it shadows an installed one) or "namespace" (a folder without __init__.py: an installed one wins)."""
    names = {}
    for folder in (ROOT, ROOT / "tests"):
        for entry in folder.iterdir():
            if entry.name.startswith((".", "_")) or entry.name.endswith(".egg-info"):
                continue
            if entry.is_dir() and entry.name.isidentifier():
                names[entry.name] = "regular" if (entry / "__init__.py").exists() else "namespace"
            elif entry.suffix == ".py" and entry.stem.isidentifier():
                names[entry.stem] = "regular"
    return names


def test_no_root_name_shadows_an_installed_distribution():
    """No regular package or module reachable from the root has the import name of an installed distribution
    (other than wpkl itself); a namespace folder of such a name must lose to the installed package."""
    provided = importlib.metadata.packages_distributions()
    names = _reachable_names()
    assert "kernels" in names and names["kernels"] == "namespace", names.get("kernels")
    clashes = {name: provided[name] for name, kind in names.items()
               if kind == "regular" and set(provided.get(name, ())) - {"wpkl"}}
    assert not clashes, f"names reachable from the repository root shadow installed distributions: {clashes}"
    contested = sorted(name for name, kind in names.items()
                       if kind == "namespace" and set(provided.get(name, ())) - {"wpkl"})
    result = _run_from_root(f"""
        import importlib, json
        out = {{}}
        for name in {contested!r}:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__file__", None)
        print(json.dumps(out))
    """)
    assert result.returncode == 0, result.stderr
    for name, origin in json.loads(result.stdout.splitlines()[-1]).items():
        assert origin is not None and not Path(origin).resolve().is_relative_to(ROOT / name), (name, origin)


def test_transformers_and_hf_kernels_import_from_the_root():
    """From the repository root a transformers model module imports, ``import kernels`` is Hugging Face's when
    it is installed, and wpkl's kernels are ``wpkl.kernels`` (the repository's kernels/ folder)."""
    pytest.importorskip("transformers", reason="transformers is in the [trl] extra")
    result = _run_from_root("""
        import importlib.metadata, json, os
        import transformers.models.qwen2.modeling_qwen2  # imports transformers/integrations/hub_kernels.py
        import wpkl.kernels
        out = {"wpkl.kernels": list(wpkl.kernels.__path__)}
        try:
            dist = importlib.metadata.distribution("kernels")
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is not None:
            import kernels
            out["kernels"] = kernels.__file__
            out["kernels dist"] = str(dist.locate_file("kernels"))
        print(json.dumps(out))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert [Path(p).resolve() for p in out["wpkl.kernels"]] == [ROOT / "kernels"]
    if "kernels" in out:
        assert Path(out["kernels"]).resolve().is_relative_to(Path(out["kernels dist"]).resolve()), out


def test_bench_runs_its_trl_provider_from_the_root(tmp_path):
    """``python -m bench`` from the root runs its TRL provider (which imports transformers' model code)."""
    pytest.importorskip("trl", reason="TRL is in the [trl] extra")
    result = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--suite", "logits", "--shapes",
                             "16x257:float32", "--providers", "trl", "--cases", "uniform", "--modes", "fwd",
                             "--no-progress", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trl | " in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_the_built_wheel_places_the_kernels_in_wpkl(tmp_path):
    """The wheel holds kernels/ as wpkl/kernels/ and ``wpkl.kernels`` resolves there (not to a checkout)."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "setuptools" in build.stderr and "No matching distribution" in build.stderr:
        pytest.skip("no setuptools reachable to build the wheel")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("wpkl-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    kernel_files = {p.name for p in (target / "wpkl" / "kernels").glob("*.py")}
    assert {"common.py", "token_divergence_fwd.py", "token_divergence_bwd.py"} <= kernel_files, kernel_files
    assert not (target / "kernels").exists()  # never a top-level package
    code = """
        import sys
        sys.meta_path[:] = [m for m in sys.meta_path if "Editable" not in getattr(m, "__name__", "")]
        import wpkl.kernels, wpkl.kernels.common as common
        print(wpkl.kernels.__path__[0], common.__file__)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-3000:]
    path, common = result.stdout.split()
    assert Path(path) == target / "wpkl" / "kernels" and Path(common).parent == target / "wpkl" / "kernels"


def test_every_subpackage_is_in_the_wheel_list():
    """pyproject's package list names every folder of wpkl/ with an __init__.py: a new layer folder left out of
    it would import from a checkout (editable install) and be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"wpkl", "wpkl.kernels"} | {"wpkl." + ".".join(p.parent.relative_to(ROOT / "wpkl").parts)
                                       for p in (ROOT / "wpkl").rglob("__init__.py") if p.parent != ROOT / "wpkl"}
    assert listed == found, {"missing": sorted(found - listed), "stale": sorted(listed - found)}
