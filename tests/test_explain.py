"""`minidiff explain`: the data it gathers, and the page it writes, driven in headless Chromium.

The browser tests need Debian's `chromium` and `chromium-driver` and the `selenium` package (`.ci/run`
installs them); where any is missing they skip with the reason. Pages are built on the quick grid.
"""
import base64
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff import explain
from minidiff.cache import mac_bound
from minidiff.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
MODELS = {"unet": REPO / "weights" / "digits-cond", "dit": REPO / "weights" / "digits-dit"}


# -- the data, without a browser -----------------------------------------------------------------------

def test_png_sheet_round_trips_exactly():
    Image = pytest.importorskip("PIL.Image")
    images = torch.rand(3, 2, 1, 4, 5)  # 3 steps x 2 samples of 4x5 grey images
    uri = explain.png_data_uri(images)
    sheet = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert sheet.size == (2 * 5, 3 * 4) and sheet.mode == "L"
    pixels = torch.frombuffer(bytearray(sheet.tobytes()), dtype=torch.uint8).reshape(12, 10)
    expected = (images * 255).round().to(torch.uint8)
    for step in range(3):  # pixel row y of step r is sheet row 3 y + r (interleaved)
        assert torch.equal(pixels[step::3, 5:10], expected[step, 1, 0])
        assert torch.equal(pixels[step::3, 0:5], expected[step, 0, 0])


def test_trajectory_ends_at_the_image_and_tracks_the_run():
    """The predicted clean image read back from consecutive DDIM samples: the last equals the output,
    and the run's statistics are generate's."""
    pipe = minidiff.load(MODELS["unet"])
    grid = explain.Grid(steps=6, batch=2)
    run = explain.run_cached(pipe, grid, cache_schedule="uniform", cache_interval=3, cache_branch=0, cache_forecast=0)
    assert run["trajectory"].shape == (6, 2, 1, 16, 16)
    assert torch.allclose(run["trajectory"][-1], run["images"], atol=1e-4)
    assert run["full_per_sample"] == [[0, 3], [0, 3]]
    ratio = pipe.shallow_ratio(0, torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))
    assert run["mac_fraction"] == pytest.approx((2 + 4 * ratio) / 6, rel=1e-6)
    # the early predictions are blurrier guesses, not the final image
    assert (run["trajectory"][0] - run["images"]).abs().max() > 0.05


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Quick pages for the U-Net (with a few probes) and the DiT, built once for the module: {kind: (folder, data)}."""
    torch.set_num_threads(1)
    out = {}
    for kind, model in MODELS.items():
        pipe = minidiff.load(model)
        grid = replace(explain.QUICK, probe_count=40 if kind == "unet" else 0)
        data = explain.gather(pipe, grid, model_dir=model, name=model.name, progress=False)
        folder = explain.write_page(data, tmp_path_factory.mktemp(kind) / "page")
        out[kind] = (folder, data)
    return out


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_page_data_is_consistent(pages, kind):
    folder, data = pages[kind]
    assert sorted(p.name for p in folder.iterdir()) == [".minidiff-output", "data.js", "explain.css", "explain.js",
                                                        "index.html"]
    text = (folder / "data.js").read_text()
    assert json.loads(text[text.index("=") + 1:].rstrip().rstrip(";")) == data
    net = data["network"]
    for b in net["branches"]:
        assert 0 < b["shallow"] < b["full"]
        assert net["mac_bound"][str(b["branch"])]["3"] == pytest.approx(mac_bound(1, 2, b["ratio"]))
    deeper = [len(b["live"]) for b in net["branches"]]
    assert deeper == sorted(deeper) and deeper[0] < deeper[-1]  # a deeper branch keeps more blocks live
    for key, run in data["runs"].items():
        assert explain.run_key(run["schedule"], run["interval"], run["branch"], run["forecast"], run["budget"]) == key
        assert 0 < run["mac_fraction"] < 1
        assert run["psnr"] is None or run["psnr"] > 10
    calls = data["settings"]["calls"]
    assert data["timeline"]["uniform"]["2"] == list(range(0, calls, 2))
    assert len(data["heatmaps"]["matrices"][data["heatmaps"]["layers"][0]]) == calls
    if kind == "unet":
        assert data["switch"]["at"][0] == 0 and data["switch"]["at"][-1] == calls
        probes = data["probes"]
        assert probes["layers"][0] == "pixels" and probes["chance"] == pytest.approx(0.1) and probes["count"] == 40
        assert all(len(a) == 2 and all(0 <= v <= 1 for v in a) for a in probes["accuracy"].values())
    else:
        assert data["probes"] is None
    assert sum(f.stat().st_size for f in folder.iterdir()) < 15e6


def test_cli_refuses_bad_input_before_work(tmp_path, capsys):
    assert cli_main(["explain", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "page")]) == 1
    assert "missing" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli_main(["explain", "--model", str(MODELS["unet"]), "--out", str(taken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1
    assert cli_main(["explain", "--model", str(MODELS["unet"]), "--out", str(taken), "--overwrite"]) == 1
    assert "nothing was touched" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine"


# -- in a real browser ---------------------------------------------------------------------------------

def _driver_or_skip():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless Chromium here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--no-first-run",
                "--window-size=1280,900"):
        options.add_argument(arg)  # every http(s) request would go to a closed port and fail loudly
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except Exception as e:  # a browser that cannot start in this sandbox
        pytest.skip(f"headless Chromium did not start: {str(e).splitlines()[0]}")


@pytest.fixture(scope="module")
def browser():
    driver = _driver_or_skip()
    yield driver
    driver.quit()


def _open(driver, folder):
    driver.get_log("browser"), driver.get_log("performance")  # drop what came before
    driver.get((folder / "index.html").as_uri())
    _wait(driver, "return !!document.querySelector('#net-svg g.block') && "
                  "document.getElementById('img-cached').width > 0")


def _wait(driver, script, timeout=10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def _view(driver) -> str:
    """Everything the page shows: figures, canvases' pixels and the text of the stats."""
    return driver.execute_script("""
        var parts = [];
        document.querySelectorAll('svg').forEach(function (s) { parts.push(s.outerHTML); });
        document.querySelectorAll('canvas').forEach(function (c) { parts.push(c.toDataURL()); });
        document.querySelectorAll('.cards, output, figcaption').forEach(function (n) { parts.push(n.textContent); });
        return parts.join('|');""")


def _set(driver, element, value):
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event(arguments[0].type === 'range' ? 'input' : 'change'));",
                          element, value)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_page_loads_clean_and_offline(browser, pages, kind):
    folder, data = pages[kind]
    _open(browser, folder)
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [r["params"]["request"]["url"] for r in requests if r["method"] == "Network.requestWillBeSent"]
    assert any(u.endswith("data.js") for u in urls)
    assert all(u.startswith(("file://", "data:")) for u in urls), [u for u in urls if not u.startswith("file")]
    blocks = browser.execute_script("return Array.from(document.querySelectorAll('#net-svg g.block'))"
                                    ".map(function (g) { return g.getAttribute('data-block'); })")
    assert blocks == [b["name"] for b in data["network"]["blocks"]]
    lines = browser.execute_script("return document.querySelectorAll('#probe-svg polyline').length")
    assert lines == (len(data["probes"]["layers"]) if data["probes"] else 0)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_branch_lights_up_its_blocks_and_interval_changes_the_image(browser, pages, kind):
    from selenium.webdriver.common.by import By

    folder, data = pages[kind]
    _open(browser, folder)
    lit = "return Array.from(document.querySelectorAll('#net-svg g.block.live')).map(function (g) {" \
          " return g.getAttribute('data-block'); })"
    for branch in data["network"]["branches"]:
        _set(browser, browser.find_element(By.ID, "net-branch"), str(branch["branch"]))
        assert browser.execute_script(lit) == branch["live"]
    image = "return document.getElementById('img-cached').toDataURL()"
    intervals = [str(k) for k in data["settings"]["intervals"]]
    _set(browser, browser.find_element(By.ID, "img-interval"), intervals[0])
    before = browser.execute_script(image)
    _set(browser, browser.find_element(By.ID, "img-interval"), intervals[-1])
    _wait(browser, f"return document.getElementById('img-cached').toDataURL() !== {json.dumps(before)}")


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_every_control_changes_the_view(browser, pages, kind):
    from selenium.webdriver.common.by import By

    folder, _ = pages[kind]
    _open(browser, folder)
    controls = browser.find_elements(By.CSS_SELECTOR, "select, input, button")
    assert len(controls) >= 12
    unchanged = []
    for control in controls:
        name = control.get_attribute("id")
        if not control.is_enabled():
            continue
        before = _view(browser)
        if control.tag_name == "button":
            browser.execute_script("arguments[0].click(); arguments[0].click()", control)  # play, pause: a step on
        elif control.tag_name == "select":
            values = [o.get_attribute("value") for o in control.find_elements(By.TAG_NAME, "option")]
            others = [v for v in values if v != control.get_attribute("value")]
            if not others:
                continue  # one choice only (e.g. a grid with a single budget)
            _set(browser, control, others[-1])
        else:
            low, high, value = (int(control.get_attribute(a)) for a in ("min", "max", "value"))
            _set(browser, control, str(high if value != high else low))
        if _view(browser) == before:
            unchanged.append(name)
    assert unchanged == []


def test_keyboard_reaches_every_control(browser, pages):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    folder, data = pages["unet"]
    _open(browser, folder)
    wanted = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('select, input, button, [tabindex=\"0\"]'))"
        ".filter(function (n) { return !n.disabled && n.offsetParent !== null; }).map(function (n) { return n.id; })"))
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    seen = []
    for _ in range(80):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        seen.append(browser.execute_script("var a = document.activeElement; return a ? a.id || a.tagName : null"))
    assert wanted and wanted <= set(seen), sorted(wanted - set(seen))
    # the focused heatmap answers the arrow keys with a reading
    browser.execute_script("document.getElementById('heat-canvas').focus()")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_DOWN).perform()  # from (1, 2) to (2, 3)
    readout = browser.execute_script("return document.getElementById('heat-readout').textContent")
    layer = browser.execute_script("return document.getElementById('heat-layer').value")
    assert readout.startswith(f"{layer}: step 2 (t=") and " vs step 3 (t=" in readout
    assert float(readout.rsplit(" ", 1)[1]) == pytest.approx(data["heatmaps"]["matrices"][layer][1][2], abs=5e-5)


def test_shipped_page_is_current():
    """docs/explain is a build of the digits model: its page files are the package's templates as they
    are now, and its data covers the full grid."""
    shipped = REPO / "docs" / "explain"
    for asset in explain.ASSETS:
        target = "index.html" if asset == "explain.html" else asset
        assert (shipped / target).read_bytes() == (REPO / "minidiff" / "assets" / asset).read_bytes(), (
            f"docs/explain/{target} is stale: rebuild with `minidiff explain --model weights/digits-cond "
            "--out docs/explain --overwrite --probes 300`")
    text = (shipped / "data.js").read_text()
    data = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))
    assert data["model"]["name"] == "digits-cond" and data["settings"]["steps"] == explain.FULL.steps
    assert len(data["runs"]) == len(explain.grid_settings(minidiff.load(MODELS["unet"]), explain.FULL,
                                                           {b["branch"]: b["ratio"] for b in data["network"]["branches"]}))
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 5e6
