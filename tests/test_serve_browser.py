"""The viewer in a real headless Chromium against a real ``medsam3 serve`` (nano) on 127.0.0.1.

Uploads a phantom, types a concept and takes the normaliser's suggestion, draws a box, segments,
checks the overlay on the canvas and the downloaded mask; then a CT volume: a whole-volume job,
slice scrolling, the NIfTI download; then a bad upload, which the page must report. Set
``MEDSAM3_SCREENSHOT=docs/serve_viewer.png`` to keep the screenshot of the 2D result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does it)",
        allow_module_level=True,
    )
selenium = pytest.importorskip("selenium", reason="needs selenium (the test extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from medsam3.serve.live import LiveServer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def chrome(download_dir: Path, profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1320,800", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False,
         "safebrowsing.enabled": False},
    )  # fmt: skip
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


def wait(driver, condition, timeout: float = 30.0, what: str = "the page"):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def downloaded(folder: Path, name: str, timeout: float = 20.0) -> Path:
    path = folder / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and not list(folder.glob("*.crdownload")) and path.stat().st_size > 0:
            return path
        time.sleep(0.05)
    raise AssertionError(f"{name} was not downloaded: {sorted(p.name for p in folder.iterdir())}")


def state(driver, expression: str):
    return driver.execute_script(f"return JSON.parse(JSON.stringify(window.medsam3Viewer.{expression}))")


def phantoms(folder: Path):
    """An ultrasound phantom (PNG) with its tumour box, and a CT volume phantom (NIfTI)."""
    import SimpleITK as sitk
    from PIL import Image

    from medsam3.data.phantoms import generate

    case = next(c for c in generate("ultrasound", n=6, seed=0) if (c.label == 1).sum() > 300)
    ys, xs = np.nonzero(case.label == 1)
    box = (int(xs.min()) - 2, int(ys.min()) - 2, int(xs.max()) + 3, int(ys.max()) + 3)
    image_path = folder / "breast_ultrasound.png"
    Image.fromarray(case.image).save(image_path)
    ct = generate("ct3d", n=1, seed=0)[0]
    volume = sitk.GetImageFromArray(ct.image.astype(np.int16))
    volume.SetSpacing(tuple(float(s) for s in reversed(ct.spacing)))
    volume_path = folder / "abdomen_ct.nii.gz"
    sitk.WriteImage(volume, str(volume_path), True)
    return image_path, case, box, volume_path, ct


def test_viewer_in_headless_chromium(tmp_path):
    image_path, case, box, volume_path, ct = phantoms(tmp_path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    server = LiveServer("nano", log_path=tmp_path / "server.log", tmpdir=tmp_path / "server_tmp",
                        env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    driver = None
    with server:
        try:
            driver = chrome(downloads, tmp_path / "profile")
            driver.get(server.url + "/")
            wait(driver, lambda d: "nano" in d.find_element(By.ID, "model-info").text, what="model info")

            # 1. upload the phantom
            driver.find_element(By.ID, "file").send_keys(str(image_path))
            wait(driver, lambda d: "image (png)" in d.find_element(By.ID, "upload-info").text, what="upload")

            # 2. type a concept in the user's words and take the normaliser's suggestion
            field = driver.find_element(By.ID, "concept")
            field.send_keys("tumour in the breast")
            suggestion = wait(
                driver,
                lambda d: next(
                    (b for b in d.find_elements(By.CSS_SELECTOR, "#suggestions .suggestion")
                     if b.get_attribute("data-concept") == "breast tumor"), None),
                timeout=60, what="the normaliser's suggestion",
            )  # fmt: skip
            suggestion.click()
            names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#concepts .concept-name")]
            assert names == ["breast tumor"]

            # 3. draw a box on the canvas (image pixels -> canvas pixels)
            canvas = driver.find_element(By.ID, "view")
            scale = driver.execute_script("return arguments[0].width", canvas) / case.image.shape[1]
            width, height = canvas.size["width"], canvas.size["height"]
            x0, y0, x1, y1 = (v * scale for v in box)
            ActionChains(driver).move_to_element_with_offset(canvas, int(x0 - width / 2), int(y0 - height / 2)) \
                .click_and_hold().move_by_offset(int(x1 - x0), int(y1 - y0)).release().perform()  # fmt: skip
            boxes = state(driver, "boxes")
            assert len(boxes) == 1 and boxes[0]["label"] == 1
            np.testing.assert_allclose(boxes[0]["box"], box, atol=1.5)

            # 4. segment: the overlay covers exactly the returned mask, scores are listed
            driver.find_element(By.ID, "segment").click()
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .prompt .score"), what="results")
            result = state(driver, "result")
            prompt = result["prompts"][0]
            assert prompt["prompt"] == "breast tumor" and prompt["asked"] == "breast tumor"
            assert prompt["boxes_in"] and prompt["count"] >= 1 and prompt["area"] > 100
            scores = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .score")]
            assert scores[0] == f"{prompt['instances'][0]['score']:.3f}"
            pixels = state(driver, "stats.overlayPixels")
            assert pixels == {"breast tumor": prompt["area"]}
            truth = case.label == 1
            assert prompt["area"] > 0.5 * truth.sum()  # nano finds the tumour it was trained on
            # the canvas really shows colour where the mask is (tumour red-tinted, gray elsewhere)
            ys, xs = np.nonzero(truth)
            cy, cx = int(np.median(ys) * scale), int(np.median(xs) * scale)
            r, g, b, _ = driver.execute_script(
                "return Array.from(arguments[0].getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data)",
                canvas, cx, cy,
            )  # fmt: skip
            assert r > g + 40 and r > b + 40, (r, g, b)
            shot = tmp_path / "viewer.png"
            driver.save_screenshot(str(shot))
            if os.environ.get("MEDSAM3_SCREENSHOT"):
                target = Path(os.environ["MEDSAM3_SCREENSHOT"])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)

            # toggling the concept hides its overlay
            driver.find_element(By.CSS_SELECTOR, "#concepts .toggle").click()
            assert state(driver, "stats.overlayPixels") == {}
            driver.find_element(By.CSS_SELECTOR, "#concepts .toggle").click()

            # 5. the downloaded mask is the mask the API reported
            from PIL import Image

            driver.find_element(By.ID, "download-mask-1").click()
            mask = np.asarray(Image.open(downloaded(downloads, "breast_tumor.png")))
            assert mask.shape == case.image.shape[:2] and int((mask > 0).sum()) == prompt["area"]

            # 6. a CT volume: scroll slices, window presets, a whole-volume job, NIfTI out
            driver.find_element(By.ID, "file").send_keys(str(volume_path))
            wait(driver, lambda d: "volume (nifti)" in d.find_element(By.ID, "upload-info").text, what="volume")
            assert driver.find_element(By.ID, "slice").get_attribute("max") == str(ct.image.shape[0] - 1)
            driver.find_element(By.CSS_SELECTOR, "#concepts .remove").click()
            field.send_keys("liver", Keys.ENTER)
            driver.execute_script(
                "const w = document.getElementById('window'); w.value = 'liver'; w.dispatchEvent(new Event('change'))"
            )
            driver.find_element(By.ID, "segment-volume").click()
            wait(driver, lambda d: "job done" in d.find_element(By.ID, "job-status").text, timeout=90, what="job")
            job = state(driver, "job")
            liver = job["result"]["prompts"][0]
            assert liver["prompt"] == "liver" and liver["voxels"] > 1000 and liver["volume_ml"] > 10
            assert "mL" in driver.find_element(By.CSS_SELECTOR, "#results .volume").text
            middle = (liver["slices"][0] + liver["slices"][1]) // 2
            driver.execute_script(
                "const s = document.getElementById('slice'); s.value = arguments[0];"
                "s.dispatchEvent(new Event('input'))", middle,
            )  # fmt: skip
            wait(driver, lambda d: (state(d, "stats.overlayPixels").get("liver") or 0) > 100, what="liver overlay")
            assert driver.find_element(By.ID, "slice-label").text.startswith(str(middle))
            driver.find_element(By.ID, "download-nifti").click()
            import nibabel as nib

            labels = np.asarray(nib.load(str(downloaded(downloads, "mask.nii.gz"))).dataobj)
            assert labels.shape == tuple(reversed(ct.image.shape)) and int((labels == 1).sum()) == liver["voxels"]

            # 7. a bad upload is reported on the page, and the server stays healthy
            bad = tmp_path / "not_an_image.png"
            bad.write_text("this is text, not a PNG")
            driver.find_element(By.ID, "file").send_keys(str(bad))
            wait(driver, lambda d: "not a readable image" in d.find_element(By.ID, "upload-info").text, what="error")
            assert "upload refused" in driver.find_element(By.ID, "status").text
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "422" not in e["message"]]
        finally:
            if driver is not None:
                driver.quit()
    log = server.log_text()
    assert "Traceback" not in log and '" 500' not in log, log[-3000:]
    assert not list((tmp_path / "server_tmp").glob("medsam3-serve-*"))  # temporary files removed on stop
    print(json.dumps({"peak_rss_mib": None if server.peak_rss is None else round(server.peak_rss / 2**20)}))
