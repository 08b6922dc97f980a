"""End to end in a real browser: report.html offline in headless Chromium, click a heat-map cell.

Chromium comes from Debian (``scripts/install-test-browser``); the test is skipped, saying why,
only where it is not installed. Selenium is given the driver's path, so it never downloads one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mapsim.plots.observer import observers_for
from mapsim.runner.run import run as run_spec
from mapsim.spec.run_spec import validate_spec


def run(spec, **kwargs):
    """A run with the pictures its spec asks for (as the CLI and mapsim.run attach them)."""
    return run_spec(spec, observers=observers_for(spec.output), **kwargs)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    spec = validate_spec({
        "name": "browser",
        "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 3},
                   "b": {"architecture": {"name": "fcn", "depth": 2, "width": 3}, "seed": 4}},
        "layers": {"a": ["blocks.0", "blocks.1"], "b": {"L1": "blocks.0", "L2": "blocks.1"}},
        "images": {"name": "files", "paths": [str(DATA / "vessels-1.png")]},
        "comparisons": [["a", "a"], ["a", "b"]],
        "output": {"report": True},
    })
    return run(spec, out_dir=tmp_path_factory.mktemp("b") / "out", progress=False).out_dir


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run scripts/install-test-browser "
                    "(needs root or passwordless sudo) to install Debian's chromium and "
                    "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_clicking_a_cell_shows_that_layer_pairs_statistics(report, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = tmp_path / "report.html"  # a copy alone: nothing beside it can be loaded
    shutil.copy(report / "report.html", page)
    browser.get(page.as_uri())
    cells = browser.find_elements(By.CSS_SELECTOR, "td.cell")
    assert cells, "the report has no heat-map cells"
    target = next(c for c in cells if c.is_displayed()
                  and c.get_attribute("data-layers") == "a:blocks.1 / b:L2")
    target.click()
    title = WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.ID, "detail-title").text)
    assert title == "pearson: a blocks.1 → b L2"
    pivot = pd.read_csv(report / "pivot.csv")
    row = pivot[(pivot.model_a == "a") & (pivot.layer_a == "blocks.1") & (pivot.model_b == "b")
                & (pivot.layer_b == "L2")].iloc[0]
    detail = browser.find_element(By.ID, "detail").text
    assert f"{row.best_mean:.3f}" in detail and f"{row.pct_well:.1f}" in detail
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#detail .mpair img")
    assert len(thumbs) == 2 * 4  # top pairs: each of the 4 maps of blocks.1 with its partner
    assert all(browser.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
    # another cell replaces the detail
    other = next(c for c in cells if c.is_displayed()
                 and c.get_attribute("data-layers") == "a:blocks.0 / a:blocks.0")
    other.click()
    assert browser.find_element(By.ID, "detail-title").text == "pearson: a blocks.0 → a blocks.0"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_heat_map_cells_are_equal_squares_with_legible_text(report, browser, tmp_path):
    """Measured in the browser as a person sees the page: every shown heat-map cell is a
    square of at least 44 CSS pixels, and no heat-map text is smaller than 12 px."""
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    shutil.copy(report / "report.html", page)
    browser.get(page.as_uri())
    boxes = browser.execute_script(
        "return [...document.querySelectorAll('td.cell')].filter(c => c.offsetParent)"
        ".map(c => {const r = c.getBoundingClientRect();"
        " return [r.width, r.height, parseFloat(getComputedStyle(c).fontSize)];});")
    assert boxes, "no heat-map cell is shown"
    widths, heights, fonts = (sorted({round(b[i], 1) for b in boxes}) for i in range(3))
    assert widths[0] >= 44 and widths[-1] - widths[0] <= 1, widths
    assert heights[0] >= 44 and abs(heights[0] - widths[0]) <= 1, (widths, heights)
    assert fonts[0] >= 12, fonts
    inner = browser.execute_script(  # the value and the interval below it
        "return [...document.querySelectorAll('td.cell b, td.cell span')].filter(c =>"
        " c.offsetParent).map(c => parseFloat(getComputedStyle(c).fontSize));")
    assert inner and min(inner) >= 12, inner
    labels = browser.execute_script(
        "return [...document.querySelectorAll('table.hm th')].filter(c => c.offsetParent"
        " && c.textContent.trim()).map(c => parseFloat(getComputedStyle(c).fontSize));")
    assert labels and min(labels) >= 12, labels
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000  # a page was rendered, not a blank window
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src^='http']")
