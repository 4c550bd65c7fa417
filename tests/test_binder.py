"""Static checks of the Binder set-up (repo2docker reads binder/, not pyproject.toml).

- every third-party package imported by mpviz/ and the notebooks is pinned in
  binder/requirements.txt, at a version inside pyproject.toml's range and equal to the pin in
  the root requirements.txt (the environment the tests run in);
- torch is the CPU build from PyTorch's CPU wheel index;
- runtime.txt picks a Python that pyproject allows; postBuild installs mpviz itself;
- the notebook named in the README's Binder badge exists.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import stat
import sys
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
BADGE = re.compile(r"https://mybinder\.org/v2/gh/[^\s)\"'>]+")


def _pins(path: Path) -> dict[str, str]:
    """{canonical name: pinned version} of a requirements file; options and comments skipped."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{path.name}: pin {line!r} exactly (==)"
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imports_of(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over mpviz/ and notebooks/ (stdlib and mpviz
    itself left out)."""
    found: dict[str, set[str]] = {}
    sources = [(p, p.read_text()) for p in sorted((ROOT / "mpviz").rglob("*.py"))]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        # IPython magics are not Python; they would not import packages anyway.
        code = "\n".join(l for l in code.splitlines() if not l.lstrip().startswith(("%", "!")))
        sources.append((nb, code))
    for path, src in sources:
        for name in _imports_of(src):
            if name in sys.stdlib_module_names or name == "mpviz" or name.startswith("_"):
                continue
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _distribution(module: str) -> str:
    """The installed distribution that provides `module` (sklearn -> scikit-learn)."""
    dists = md.packages_distributions().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it"
    return canonicalize_name(dists[0])


def test_binder_files_exist_and_are_well_formed():
    assert (BINDER / "requirements.txt").is_file()
    # An environment.yml would make repo2docker ignore requirements.txt.
    assert not (BINDER / "environment.yml").exists() and not (ROOT / "environment.yml").exists()
    runtime = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-(\d+)\.(\d+)", runtime)
    assert m, f"runtime.txt must read like 'python-3.11', got {runtime!r}"
    assert Version(f"{m[1]}.{m[2]}") in SpecifierSet(_pyproject()["project"]["requires-python"])
    post = BINDER / "postBuild"
    assert post.stat().st_mode & stat.S_IXUSR, "binder/postBuild must be executable (chmod +x)"
    text = post.read_text()
    assert text.startswith("#!"), "postBuild needs a shebang line"
    assert re.search(r"pip install .*--no-deps.* -e \.", text), "postBuild must install mpviz itself"
    start = BINDER / "start"
    if start.exists():
        assert start.read_text().rstrip().endswith('exec "$@"')


def test_binder_uses_cpu_torch_from_pytorch_cpu_index():
    text = (BINDER / "requirements.txt").read_text()
    assert re.search(r"^--extra-index-url https://download\.pytorch\.org/whl/cpu\s*$", text, re.M)
    assert _pins(BINDER / "requirements.txt")["torch"].endswith("+cpu")


def test_every_imported_package_is_pinned_for_binder_within_pyproject_ranges():
    binder = _pins(BINDER / "requirements.txt")
    root = _pins(ROOT / "requirements.txt")
    project = _pyproject()["project"]
    ranges = {}
    for line in project["dependencies"] + project["optional-dependencies"].get("dashboard", []):
        req = Requirement(line)
        ranges[canonicalize_name(req.name)] = req.specifier

    extras = {canonicalize_name(Requirement(line).name)
              for name, lines in project["optional-dependencies"].items() if name in ("hf", "lightning", "export")
              for line in lines}
    imported = _third_party_imports()
    assert {"torch", "plotly", "ipywidgets", "pandas"} <= set(imported), imported
    for module, files in sorted(imported.items()):
        dist = _distribution(module)
        if all(f.startswith("mpviz/integrations/") for f in files):
            # The optional integrations (mpviz[hf], [lightning], [export]): declared as extras,
            # imported only when used, not needed by the apps on Binder.
            assert dist in extras, f"{dist} is imported by {sorted(files)} but is no optional extra in pyproject.toml"
            continue
        assert dist in binder, f"{module} (pip: {dist}) is imported by {sorted(files)} but not in binder/requirements.txt"
        assert dist in ranges, f"{dist} is imported by {sorted(files)} but missing from pyproject.toml"
    # Everything the package declares (and the apps need) is there too, at matching versions.
    for dist, spec in ranges.items():
        assert dist in binder, f"{dist} (pyproject.toml) is missing from binder/requirements.txt"
        v = Version(binder[dist])
        assert spec.contains(v, prereleases=True), f"binder pins {dist}=={v}, outside pyproject's {spec}"
        assert dist in root, f"{dist} is missing from the root requirements.txt"
        assert Version(root[dist]).public == v.public, \
            f"{dist}: binder pins {v}, requirements.txt pins {root[dist]}; keep them equal"
    # What a user runs in the apps must be what the tests ran: the installed versions match.
    for dist in ("plotly", "ipywidgets", "voila", "anywidget"):
        assert Version(md.version(dist)).public == Version(binder[dist]).public


def test_binder_badge_opens_an_existing_notebook_in_voila():
    src = ROOT / "README.md"
    links = BADGE.findall(src.read_text())
    assert links, f"no mybinder.org link in {src.name}"
    for link in links:
        url = urlparse(link)
        assert url.path.rstrip("/").endswith("/HEAD") or re.search(r"/v2/gh/[^/]+/[^/]+/[^/]+$", url.path)
        urlpath = unquote(parse_qs(url.query)["urlpath"][0])
        assert urlpath.startswith("voila/render/"), f"{link}: urlpath should open Voila, got {urlpath}"
        notebook = ROOT / urlpath.removeprefix("voila/render/")
        assert notebook.is_file(), f"{link} opens {notebook.relative_to(ROOT)}, which does not exist"
    assert any("notebooks/lab.ipynb" in unquote(l) for l in links), "the badge should open the lab"


def _repo2docker() -> str | None:
    exe = Path(sys.executable).parent / "repo2docker"
    return str(exe) if exe.exists() else None


@pytest.mark.skipif(_repo2docker() is None,
                    reason="optional: `.venv/bin/pip install jupyter-repo2docker==2026.4.0` to check "
                           "the Dockerfile repo2docker would build")
def test_repo2docker_would_install_binder_requirements_and_run_postbuild(tmp_path):
    import subprocess

    # Only the files repo2docker looks at, so the check does not read the venv or runs/.
    for name in ("binder", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            (tmp_path / name).mkdir()
            for f in src.iterdir():
                (tmp_path / name / f.name).write_bytes(f.read_bytes())
                os.chmod(tmp_path / name / f.name, f.stat().st_mode)
        else:
            (tmp_path / name).write_bytes(src.read_bytes())
    out = subprocess.run([_repo2docker(), "--no-build", "--debug", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    assert re.search(r'pip install .*-r "?binder/requirements\.txt', text), text[-2000:]
    assert "RUN ./binder/postBuild" in text
    assert re.search(r"python=3\.11", text), text[-2000:]   # from runtime.txt
