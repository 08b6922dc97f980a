"""The documentation: README.md and the mkdocs site in docs/.

* the site builds with ``mkdocs build --strict`` (broken links and anchors between pages fail);
* every relative link and image in README.md and docs/*.md points to an existing file;
* the README stays a front page (at most 12,500 bytes);
* every spec snippet validates with ``python -m mapsim validate``. A fenced ``yaml`` block is a
  snippet when its first line is ``# spec`` (a whole run spec), ``# spec fragment`` (top-level
  fields laid over a minimal spec) or ``# training spec`` (a whole training spec); see
  docs/development.md;
* the plugin package on docs/plugins.md (its blocks start with ``# file: <path>``) passes its
  own tests, mapsim's metric contract included; installed, it is found through its entry
  point, and the page's ``# plugin spec`` blocks validate with it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_LIMIT = 12_500

#: a fenced block: its opening fence (``` or ~~~, maybe indented), info string and body
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)"
                   r"^(?P=indent)(?P=fence)[ \t]*$", re.M | re.S)
#: inline links and images [text](target "title"), and <img src="...">
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"", re.I)

#: the spec a ``# spec fragment`` is laid over: the bundled CNN1 on two small synthetic images
BASE_SPEC = {
    "name": "fragment",
    "models": {"cnn1": {"architecture": {"name": "fcn", "depth": 1, "width": 64,
                                         "kernel_size": 7},
                        "weights": "pretrained:cnn1"}},
    "layers": {"cnn1": {"L1": "blocks.0"}},
    "images": {"name": "synthetic-vessels", "count": 2, "size": [64, 64], "seed": 7},
}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block of a page, body dedented."""
    out = []
    for match in FENCE.finditer(page.read_text(encoding="utf-8")):
        indent = match["indent"]
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match["body"].splitlines(keepends=True))
        out.append((match["info"].strip(), body))
    return out


def prose(page: Path) -> str:
    """The page without its fenced code blocks (links in code are not links)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def snippets(kind: str) -> list[pytest.param]:
    """The yaml blocks whose first line is ``# <kind>``, one pytest param each."""
    found = []
    for page in PAGES:
        n = 0
        for info, body in blocks(page):
            if info.split()[:1] != ["yaml"]:
                continue
            first = body.splitlines()[0].strip() if body.strip() else ""
            if first == f"# {kind}":
                n += 1
                name = f"{page.stem}-{kind.replace(' ', '-')}-{n}"
                found.append(pytest.param(body, id=name))
    return found


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapsim", "validate", str(path)],
                          capture_output=True, text=True, cwd=path.parent, timeout=300)


# --------------------------------------------------------------------------- the site
def test_site_builds_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not importable: pip install -e '.[test]' "
                    "installs mkdocs-material, which the docs build needs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / name).is_file(), f"{page.name} was not built"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", nav, re.M), \
            f"docs/{page.name} is not in mkdocs.yml's nav"


# --------------------------------------------------------------------------- links
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    text = prose(page)
    targets = LINK.findall(text) + IMG.findall(text)
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "//")):
            continue  # a URL (http:, mailto:, ...) or an anchor on the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_readme_is_a_front_page():
    size = README.stat().st_size
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes (at most {README_LIMIT}): move reference content to docs/")


def test_readme_keeps_the_ci_command():
    """.ci/run calls the README's test command verbatim."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in [body.strip() for _, body in blocks(README)]


# --------------------------------------------------------------------------- spec snippets
def test_there_are_spec_snippets():
    assert len(snippets("spec")) >= 5 and len(snippets("spec fragment")) >= 5


@pytest.mark.parametrize("text", snippets("spec"))
def test_spec_snippet_validates(text, tmp_path, request):
    path = tmp_path / f"{request.node.callspec.id}.yaml"
    path.write_text(text, encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n--- snippet:\n{text}"
    assert "is valid" in result.stdout


@pytest.mark.parametrize("text", snippets("spec fragment"))
def test_spec_fragment_validates(text, tmp_path, request):
    fragment = yaml.safe_load(text)
    assert isinstance(fragment, dict) and fragment, f"not a mapping of spec fields:\n{text}"
    path = tmp_path / f"{request.node.callspec.id}.yaml"
    path.write_text(yaml.safe_dump({**BASE_SPEC, **fragment}, sort_keys=False),
                    encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n--- fragment:\n{text}"


@pytest.mark.parametrize("text", snippets("training spec"))
def test_training_spec_snippet_validates(text, tmp_path, request):
    path = tmp_path / f"{request.node.callspec.id}.yaml"
    path.write_text(text, encoding="utf-8")
    code = ("import sys; from mapsim.spec.train_spec import load_train_spec; "
            "load_train_spec(sys.argv[1]); print('valid')")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n--- snippet:\n{text}"


# --------------------------------------------------------------------------- plugin skeleton
def test_plugin_skeleton_passes_its_own_tests(tmp_path):
    """The package on docs/plugins.md, assembled from its ``# file:`` blocks, passes its
    tests (values against numpy and mapsim.testing.MetricContract)."""
    package = tmp_path / "mapsim-plugin"
    files = {}
    for _, body in blocks(DOCS / "plugins.md"):
        first = body.splitlines()[0] if body else ""
        match = re.match(r"#\s*file:\s*(\S+)\s*$", first)
        if match:
            files[match[1]] = body
    assert {"pyproject.toml", "tests"} <= {Path(f).parts[0] for f in files}, sorted(files)
    for name, body in files.items():
        target = package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=package, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout

    # Installed (into a folder of its own, not the test environment), mapsim finds it through
    # its entry point, and the page's `# plugin spec` blocks validate.
    site = tmp_path / "site-packages"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(site), str(package)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    specs = [p.values[0] for p in snippets("plugin spec")]
    assert specs, "docs/plugins.md shows no `# plugin spec` using the plugin"
    for n, text in enumerate(specs):
        path = tmp_path / f"plugin-spec-{n}.yaml"
        path.write_text(text, encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "mapsim", "validate", str(path)],
                                capture_output=True, text=True, cwd=tmp_path, env=env,
                                timeout=300)
        assert result.returncode == 0, f"{result.stdout}{result.stderr}\n--- snippet:\n{text}"
