"""explain.py's page in a real browser: headless Chromium opens the file from disk, its script runs
without an error and fetches nothing, and a click on a character changes the attention and attribution
views. Skipped, saying why, where Selenium (pip install selenium) or Debian's chromium and
chromium-driver are not installed: CI installs no browser, so it skips there.

    python tests/test_explain_browser.py docs/explain.png    # the README's screenshot, from the same run
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import explain  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# No network, no first-run work, nothing of the user's profile.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1100"]


def browser(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, errors included
    return webdriver.Chrome(options=options, service=Service(DRIVER))  # given the driver: Selenium fetches none


def open_and_click(folder, pick=lambda text: len(text) // 2, screenshot=None):
    """Write the shipped model's page on the first validation story into folder, open it in Chromium,
    click the character pick(text) picks; what the page showed before and after the click."""
    from selenium.webdriver.common.by import By

    page = Path(folder) / "explain.html"
    shipped = os.path.relpath(ROOT / "pretrained" / "tinystories-char.pt")  # as the page names it
    explain.main([f"--checkpoint={shipped}", "--device=cpu",
                  "--max_new_tokens=300", f"--out={page}"])
    driver = browser(Path(folder) / "profile")
    try:
        driver.get(page.as_uri())
        views = lambda: {name: driver.find_element(By.ID, name).get_attribute("innerHTML")  # noqa: E731
                         for name in ("chosen-title", "heads", "bars")}
        before = views()
        text = driver.execute_script("return D.tokens.join('')")
        j = pick(text)
        span = driver.find_element(By.CSS_SELECTOR, f'#text span[data-j="{j}"]')
        span.click()
        after = views()
        seen = {"before": before, "after": after, "j": j, "class": span.get_attribute("class"),
                "sum": driver.find_element(By.CSS_SELECTOR, "#bars .sum").text,
                "fetched": driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"),
                "errors": [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]}
        if screenshot:
            driver.save_screenshot(str(screenshot))
        return seen
    finally:
        driver.quit()


def test_a_click_on_a_character_changes_the_attention_and_attribution_views_in_chromium(tmp_path):
    pytest.importorskip("selenium", reason="needs Selenium (pip install selenium) to drive Chromium")
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    seen = open_and_click(tmp_path)
    assert seen["errors"] == [] and seen["fetched"] == []  # the script ran, and nothing came from elsewhere
    assert "chosen" in seen["class"] and f"number {seen['j'] + 1} of" in seen["after"]["chosen-title"]
    assert seen["after"]["heads"] != seen["before"]["heads"] and seen["after"]["bars"] != seen["before"]["bars"]
    bars, logit = seen["sum"].removeprefix("sum of the bars ").split("; the logit of ")
    assert float(bars) == pytest.approx(float(logit.split()[-1]), abs=0.002)  # equal, to the page's digits


if __name__ == "__main__":
    # The README's picture: the same run, with the character after the "K" of the name's second
    # "Kitty" chosen, where a head looks back at the first.
    with tempfile.TemporaryDirectory() as folder:
        seen = open_and_click(folder, lambda text: text.index("Kitty", text.index("Kitty") + 1) + 1, sys.argv[1])
    print(f"wrote {sys.argv[1]}; errors {seen['errors']}, fetched {seen['fetched']}")
