"""Every spec in examples/invalid/ fails with a clear message, exit status 2 and no traceback.

Each file shows one mistake a user makes. ``EXPECTED`` pins, per file, the phase that catches it
(``validate``: the spec itself is wrong; ``run``: the spec is valid but names a layer, file or
label that does not exist, which ``validate --deep`` and ``mapsim run`` catch) and the parts of
the message that matter. A new invalid example without an entry here fails
:func:`test_every_example_has_an_entry`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mapsim.cli import main

INVALID = Path(__file__).resolve().parents[1] / "examples" / "invalid"

#: file name -> (phase that catches it, substrings the error message must contain)
EXPECTED: dict[str, tuple[str, list[str]]] = {
    "typo-in-field.yaml": (
        "validate",
        ["typo-in-field.yaml: the spec is not valid (1 problem(s)):",
         "  metircs: unknown field; did you mean 'metrics'?"],
    ),
    "unknown-metric.yaml": (
        "validate",
        ["  metrics.0: unknown metric 'pearsn'.", "Closest: pearson.",
         "Registered metrics: cka, cosine, euclidean, ", "`mapsim plugins`"],
    ),
    "wrong-parameter-type.yaml": (
        "validate",
        ["  models.cnn.architecture.depth: Input should be a valid integer", "(got 'six')"],
    ),
    "unknown-model-in-comparisons.toml": (
        "validate",
        ["unknown-model-in-comparisons.toml: the spec is not valid",
         "comparisons: the model 'cnn5' is not in 'models' (cnn4, cnn6)."],
    ),
    "unknown-layer.yaml": (
        "run",
        ["unknown layer 'block.1'.", "Closest matches: blocks.1,",
         "No layer of model 'cnn' matches 'block.1'.", "`mapsim layers`"],
    ),
    "images-match-nothing.yaml": (
        "run",
        ["the image pattern '../data/vesels-*.png'", "matches no file"],
    ),
    "missing-weights.json": (
        "run",
        ["weights file ", "missing.safetensors' does not exist",
         "relative paths are resolved against the spec's directory"],
    ),
    "roi-without-labels.yaml": (
        "run",
        ["engine.roi needs a label for image vessels-1", "add 'labels' to the images entry"],
    ),
}

EXAMPLES = sorted(p.name for p in INVALID.iterdir() if p.is_file() and p.suffix != ".md")


def test_every_example_has_an_entry() -> None:
    assert EXAMPLES, f"no examples in {INVALID}"
    missing = sorted(set(EXAMPLES) - set(EXPECTED))
    assert not missing, f"add the expected message of {missing} to EXPECTED"
    stale = sorted(set(EXPECTED) - set(EXAMPLES))
    assert not stale, f"EXPECTED names files that are gone: {stale}"


def test_examples_cover_every_spec_format() -> None:
    suffixes = {Path(name).suffix for name in EXAMPLES}
    assert {".yaml", ".toml", ".json"} <= suffixes


def assert_clean_failure(code: int, out: str, err: str, expected: list[str]) -> None:
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert err.startswith("mapsim: error: "), err
    assert "Traceback" not in err
    assert "Traceback" not in out
    for part in expected:
        assert part in err, f"{part!r} not in the message:\n{err}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_validate(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    phase, expected = EXPECTED[name]
    code = main(["validate", str(INVALID / name)])
    out, err = capsys.readouterr()
    if phase == "validate":
        assert_clean_failure(code, out, err, expected)
        assert "is valid" not in out
    else:  # the mistake is only visible once models are built and files resolved
        assert code == 0, err
        assert "is valid" in out


@pytest.mark.parametrize("name", EXAMPLES)
def test_validate_deep_catches_every_example(name: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever can be known without running the network is checked by `validate --deep`:
    no example passes it, and each fails with the message `mapsim run` gives."""
    _, expected = EXPECTED[name]
    code = main(["validate", "--deep", str(INVALID / name)])
    out, err = capsys.readouterr()
    assert_clean_failure(code, out, err, expected)
    assert "is valid" not in out


@pytest.mark.parametrize("name", EXAMPLES)
def test_run_fails_and_leaves_nothing(name: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, expected = EXPECTED[name]
    parent = tmp_path / "results"
    out_dir = parent / "run"
    code = main(["run", str(INVALID / name), "--out", str(out_dir), "--quiet"])
    out, err = capsys.readouterr()
    assert_clean_failure(code, out, err, expected)
    assert not out_dir.exists()
    leftovers = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert leftovers == [], f"a failed run left {leftovers} in {parent}"
