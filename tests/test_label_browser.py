"""The label page in a real headless browser (Debian's Chromium through its chromedriver): a person names
themself, judges with keys and clicks, comments, reloads and resumes; an answer holding markup stays text; and the
file the page wrote trains a reward model."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import pair_rows, reward_overrides, write_jsonl
from servers import RunningLabel

from align.serving.label_items import Setup
from align.serving.label_session import LabelSession

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HOSTILE = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"> & <b>not bold</b>'

if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must have Chromium and chromedriver: .ci/run installs Debian's chromium and "
                           "chromium-driver")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(condition, seconds=60, what="the page"):
    deadline = time.time() + seconds
    while True:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - an element between two renders: look again
            value = None
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.1)


def text(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def press(driver, key):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def judged(driver, n):
    return wait(lambda: text(driver, "progress-text").startswith(f"{n} judged"), what=f"{n} judged")


def test_a_person_labels_in_a_browser_and_the_file_trains_a_reward_model(browser, tmp_path, tiny_model_dir,
                                                                         reward_data_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rows = [{"prompt": "What is <i>2</i> + 3?", "chosen": "2 + 3 = 5. The answer is 5.", "rejected": HOSTILE}]
    rows += pair_rows([(a, b) for a in range(3, 9) for b in (2, 5)])
    out = tmp_path / "labels.jsonl"
    session = LabelSession(Setup(pairs=str(write_jsonl(tmp_path / "pairs.jsonl", rows))), out)
    with RunningLabel(session) as srv:
        started = time.monotonic()
        browser.get(srv.url + "/")
        name = wait(lambda: browser.find_element(By.ID, "name-input").is_displayed() and
                    browser.find_element(By.ID, "name-input"), what="the name form")
        name.send_keys("ana", Keys.ENTER)
        wait(lambda: text(browser, "answer-a"), what="the first pair")
        first_pair_s = time.monotonic() - started
        assert not browser.find_element(By.ID, "name-form").is_displayed()

        # the hostile answer is shown as the characters it holds, and nothing in it ran or became an element
        shown = text(browser, "answer-a") + text(browser, "answer-b")
        assert "<script>window.pwned = 1</script>" in shown and "<b>not bold</b>" in shown
        assert text(browser, "prompt") == "What is <i>2</i> + 3?"
        assert browser.execute_script("return window.pwned === undefined")
        for box in ("prompt", "answer-a", "answer-b"):
            assert not browser.find_elements(By.CSS_SELECTOR, f"#{box} *")
        hostile_side = "a" if "pwned" in text(browser, "answer-a") else "b"
        browser.save_screenshot(str(tmp_path / "label-page.png"))

        press(browser, "1" if hostile_side == "b" else "2")  # the good answer wins, by key
        judged(browser, 1)
        browser.find_element(By.ID, "judge-b").click()  # by click
        judged(browser, 2)
        comment = browser.find_element(By.ID, "comment")
        comment.click()
        comment.send_keys("t and x typed here are text, not shortcuts")
        judged(browser, 2)  # typing in the comment box judged nothing
        comment.send_keys(Keys.ESCAPE)
        press(browser, "x")  # both bad, with the comment
        judged(browser, 3)
        press(browser, "s")
        wait(lambda: "1 skipped" in text(browser, "progress-text"), what="the skip")
        before_reload = text(browser, "prompt")

        browser.refresh()  # the name is remembered and the page resumes where it stopped
        wait(lambda: text(browser, "progress-text").startswith("3 judged, 1 skipped"), what="resuming")
        assert text(browser, "prompt") == before_reload and text(browser, "who") == "annotator: ana"
        for _ in range(5):
            press(browser, "a")
            time.sleep(0.05)
        judged(browser, 8)
        status, body = srv.call("/api/progress?annotator=ana")
        assert status == 200 and body["judged"] == 8

    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 8 and [r["label"] for r in written[:3]] == [
        "a" if hostile_side == "b" else "b", "b", "both_bad"]
    assert written[0]["chosen"] == "2 + 3 = 5. The answer is 5." and written[0]["rejected"] == HOSTILE
    assert written[2]["comment"] == "t and x typed here are text, not shortcuts"
    assert len({r["item"] for r in written}) == 8  # no item judged twice, none lost

    from align.runtime.config import RewardConfig, load_config
    from align.stages import reward

    overrides = reward_overrides(tmp_path, tiny_model_dir, out, reward_data_files[1])
    cfg = load_config(RewardConfig, None, [*overrides, "training.max_steps=3", "training.batch_size=2"])
    run = Path(reward.run(cfg))
    assert (run / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    # every judgement but the "both bad" one is a pair; nothing was refused
    assert metrics["n_train"] == 7 and metrics["n_train_rejected"] == 0 and metrics["steps"] == 3
    assert {p["source"] for p in metrics["train_probe"]} == {str(out)}
    print(f"first pair shown {first_pair_s:.2f} s after the page was asked for")
