"""The page of tools/serve.py in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
type a prompt, press Generate, wait for the image, check its size, take a screenshot.

    SERVE_SCREENSHOT=docs/serve.png python -m pytest tests/test_serve_browser.py

refreshes the screenshot that README.md shows (without it, the screenshot goes to the test's temporary folder).
"""

import os
import shutil
import struct

import pytest
from serving import ROOT, Limits, Service

from flux_parallel.flux.images import encode_png
from flux_parallel.flux.pipeline import FluxPipeline

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -e '.[test]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WINDOW = (1000, 1000)
# a held-out caption of the trained tiny model (its 64 px world), so the screenshot shows what it draws
CAPTION = "a large yellow circle in the center on an orange background"


@pytest.fixture
def url():
    service = Service(FluxPipeline.tiny(), (64, 64), Limits())
    service.start_ranks()
    yield str(service.client.base_url)
    service.close()


@pytest.fixture
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_page_generates_an_image(url, browser, tmp_path):
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "width").get_attribute("value") == "64")  # defaults from /health
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(CAPTION)
    for field, value in (("width", "64"), ("height", "64"), ("steps", "4"), ("seed", "7")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "generate").click()
    image = wait.until(expected_conditions.visibility_of_element_located((By.ID, "image")))
    wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [64, 64]
    assert image.get_attribute("alt") == CAPTION
    timings = browser.find_element(By.ID, "timings").text
    assert timings.startswith("64x64, 4 steps, seed 7") and "denoise" in timings and "vae" in timings
    assert browser.find_element(By.ID, "status").text == "done"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#recent figure")) == 1
    screenshot = ROOT / os.environ["SERVE_SCREENSHOT"] if "SERVE_SCREENSHOT" in os.environ else tmp_path / "serve.png"
    assert browser.save_screenshot(str(screenshot))
    viewport = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert list(struct.unpack(">II", screenshot.read_bytes()[16:24])) == viewport  # PNG width, height


def test_page_uploads_an_image_and_a_drawn_mask_and_streams_progress(url, browser, tmp_path):
    """An image to edit and a mask drawn on it with the mouse go to /v1/images/edits (a text-to-image
    model inpaints); the progress bar follows the streamed step events."""
    from selenium.webdriver.common.action_chains import ActionChains

    source = tmp_path / "source.png"
    source.write_bytes(encode_png(FluxPipeline.tiny()(CAPTION, height=64, width=64, output_type="pt")[0]))
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "width").get_attribute("value") == "64")
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("a large red circle in the center on an orange background")
    browser.find_element(By.ID, "image_file").send_keys(str(source))
    mask = wait.until(expected_conditions.visibility_of_element_located((By.ID, "mask")))
    ActionChains(browser).move_to_element(mask).click_and_hold().move_by_offset(20, 10).release().perform()
    assert browser.execute_script("return maskDrawn")
    browser.execute_script("""new MutationObserver(() => window.seen.push($("progress").value))
        .observe($("progress"), {attributes: true}); window.seen = [];""")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text in ("done",) or "error" in
               b.find_element(By.ID, "status").get_attribute("class"))
    assert browser.find_element(By.ID, "status").text == "done"
    assert browser.find_element(By.ID, "timings").text.startswith("inpaint · 64x64, 4 steps")
    steps = browser.execute_script("return window.seen")
    # inpainting at the default strength 0.6 runs the last 3 of the 4 steps: the bar went to 3 of 3
    assert max(steps) == browser.execute_script("return $('progress').max") == 3
