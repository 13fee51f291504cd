"""The viewer's "Segment volume" with a drawn box, in headless Chromium against ``medsam3 serve`` (lite).

Upload a NIfTI volume with one lesion, scroll to its middle slice, draw a box there, segment the
volume (propagation from the box), download the NIfTI and score it against the lesion's truth.
"""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.serve.live import LiveServer
from test_serve_browser import chrome, downloaded, state, wait  # skips the module without chromium/selenium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_viewer_box_on_a_slice_segments_the_lesion_in_3d(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from medsam3.data.masks import mask_box

    depth, size = 12, 96
    z, y, x = np.ogrid[:depth, :size, :size]
    truth = ((z - 6) / 3.2) ** 2 + ((y - 40) / 14.0) ** 2 + ((x - 52) / 12.0) ** 2 <= 1.0  # slices 3..9
    array = np.random.default_rng(0).normal(60.0, 12.0, truth.shape).astype(np.float32)
    array[truth] = 220.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    path = tmp_path / "lesion.nii.gz"
    sitk.WriteImage(image, str(path), True)
    box = mask_box(truth[6])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    server = LiveServer("lite", log_path=tmp_path / "server.log", tmpdir=tmp_path / "server_tmp")
    driver = None
    with server:
        try:
            driver = chrome(downloads, tmp_path / "profile")
            driver.get(server.url + "/")
            wait(driver, lambda d: "lite" in d.find_element(By.ID, "model-info").text, timeout=120, what="model")
            driver.find_element(By.ID, "file").send_keys(str(path))
            wait(driver, lambda d: "volume (nifti)" in d.find_element(By.ID, "upload-info").text, what="volume")
            driver.find_element(By.ID, "concept").send_keys("lesion", Keys.ENTER)
            driver.execute_script(
                "const s = document.getElementById('slice'); s.value = 6; s.dispatchEvent(new Event('input'))"
            )
            wait(driver, lambda d: state(d, "slice") == 6, what="slice 6")
            canvas = driver.find_element(By.ID, "view")
            scale = driver.execute_script("return arguments[0].width", canvas) / size
            width, height = canvas.size["width"], canvas.size["height"]
            x0, y0, x1, y1 = (v * scale for v in box)
            ActionChains(driver).move_to_element_with_offset(canvas, int(x0 - width / 2), int(y0 - height / 2)) \
                .click_and_hold().move_by_offset(int(x1 - x0), int(y1 - y0)).release().perform()  # fmt: skip
            (drawn,) = state(driver, "boxes")
            assert drawn["slice"] == 6 and drawn["label"] == 1
            driver.find_element(By.ID, "segment-volume").click()
            wait(driver, lambda d: "job done" in d.find_element(By.ID, "job-status").text, timeout=300, what="job")
            assert state(driver, "job")["result"]["method"] == "propagate"
            driver.find_element(By.ID, "download-nifti").click()
            labels = np.asarray(nib.load(str(downloaded(downloads, "mask.nii.gz"))).dataobj).transpose(2, 1, 0)
        finally:
            if driver is not None:
                driver.quit()
    found = labels == 1
    dice = 2.0 * float((found & truth).sum()) / float(found.sum() + truth.sum())
    assert dice > 0.75, dice
