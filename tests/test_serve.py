"""The search page: routes and path safety (Flask's test client), and a real headless browser.

The browser is Debian's chromium driven through its chromium-driver with selenium; nothing here
downloads a browser. .ci/run installs both packages, so CI runs the browser test.
"""
import glob
import io
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import read_image
from eees_jax import search, serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TEXT = "a woman with long hair in a dark skirt, carrying a backpack"


@pytest.fixture(scope="module")
def searcher(tiny_workdir, tmp_path_factory):
  from eees_jax import inference
  model = inference.load(tiny_workdir["workdir"])
  out = str(tmp_path_factory.mktemp("serve") / "index")
  search.build_index(model, tiny_workdir["root"], out, "sysu", progress=False)
  return search.Searcher(search.read_index(out), model)


@pytest.fixture(scope="module")
def client(searcher):
  return serve.create_app(searcher, k=5).test_client()


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def test_thumbnails_come_from_the_index_folder_only(searcher, client, tmp_path):
  entry = searcher.index.entries[0]
  ok = client.get(f"/image/{entry.path}")
  assert ok.status_code == 200
  assert ok.data == open(os.path.join(searcher.index.images, entry.path), "rb").read()
  root = searcher.index.images
  for bad in ("../run/config.json", "cam1/../../run/config.json", "%2e%2e/run/config.json",
              "..%2frun%2fconfig.json", "/etc/passwd", "descriptions.jsonl", "exp/test_id.txt",
              "cam1/0001", entry.path + "/../../descriptions.jsonl"):
    assert client.get(f"/image/{bad}", follow_redirects=True).status_code == 404, bad
  assert os.path.exists(os.path.join(root, "descriptions.jsonl"))  # exists, but not an image
  # An indexed path that became a link out of the image folder is refused too.
  outside = tmp_path / "secret.jpg"
  shutil.copy(os.path.join(root, entry.path), outside)
  index = searcher.index
  linked = search.Entry("cam1/link.jpg", "visible", 1)
  os.symlink(outside, os.path.join(root, linked.path))
  listed = search.Searcher.__new__(search.Searcher)  # the index with the link listed in it
  listed.index = search.Index(index.path, index.meta, index.entries + [linked], index.features,
                              index.joint)
  try:
    assert serve.create_app(listed).test_client().get(f"/image/{linked.path}").status_code == 404
  finally:
    os.remove(os.path.join(root, linked.path))


def test_routes_render_results_and_errors(searcher, client):
  page = client.get("/")
  assert page.status_code == 200 and b"EEES person search" in page.data
  text = client.get("/", query_string={"text": TEXT, "gallery": "infrared", "k": 4})
  html = text.data.decode()
  want = searcher.by_text(TEXT, 4, "infrared")
  assert [html.count(f'data-path="{h.entry.path}"') for h in want] == [1] * 4
  assert html.count('class="result"') == 4
  entry = client.get("/", query_string={"entry": want[0].index, "k": 3})
  assert entry.data.decode().count('class="result"') == 3
  image = read_image(os.path.join(searcher.index.images, "cam3/0001/0001.jpg"))
  fused = client.post("/search/image", data={
      "image": (io.BytesIO(_png(image)), "q.png"), "modality": "infrared", "text": TEXT,
      "gallery": "visible", "k": "3"}, content_type="multipart/form-data")
  html = fused.data.decode()
  assert fused.status_code == 200 and "infrared image + sentence" in html
  for h in searcher.by_image_and_text(image, "infrared", TEXT, 3, "visible"):
    assert f'data-path="{h.entry.path}"' in html
  for data, message in (({"modality": "infrared"}, "choose an image file"),
                        ({"image": (io.BytesIO(b"no image"), "x.png"), "modality": "visible"},
                         "not an image"),
                        ({"image": (io.BytesIO(_png(image)), "q.png"), "modality": "thermal"},
                         "query modality")):
    bad = client.post("/search/image", data=data, content_type="multipart/form-data")
    assert bad.status_code == 400 and message in bad.data.decode()
  assert client.get("/", query_string={"text": "x", "gallery": "thermal"}).status_code == 400
  assert client.get("/", query_string={"text": "x", "k": "many"}).status_code == 400
  assert client.get("/", query_string={"entry": "99999"}).status_code == 400
  # User text is escaped.
  assert b"<script>" not in client.get("/", query_string={"text": "<script>x</script>"}).data


@pytest.fixture
def server(searcher):
  from werkzeug.serving import make_server
  httpd = make_server("127.0.0.1", 0, serve.create_app(searcher, k=6))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_port}"
  finally:
    httpd.shutdown()
    thread.join(10)


def _browser():
  if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed "
                "(apt-get install chromium chromium-driver; .ci/run installs them)")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1360,1000"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_a_browser_searches_by_text_and_by_image(searcher, server, tmp_path):
  from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions
  from selenium.webdriver.support.ui import Select, WebDriverWait
  driver = _browser()
  try:
    # While a submitted form loads, elements of the previous page go stale: keep waiting.
    wait = WebDriverWait(driver, 20, ignored_exceptions=(NoSuchElementException,
                                                         StaleElementReferenceException))

    def shown():
      """The result cards' paths, once every thumbnail has loaded (False if one never does)."""
      wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
      cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
      paths = [c.get_attribute("data-path") for c in cards]
      loaded = WebDriverWait(driver, 10).until(lambda d: d.execute_script(
          "return Array.from(document.querySelectorAll('#results img'))"
          ".every(i => i.complete && i.naturalWidth > 0)"))
      return paths, loaded

    driver.get(server + "/")
    assert f"{len(searcher.index.entries)} images" in driver.find_element(By.TAG_NAME, "header").text
    # A sentence, among the infrared images.
    driver.find_element(By.ID, "text-query").send_keys(TEXT)
    Select(driver.find_element(By.ID, "text-gallery")).select_by_value("infrared")
    driver.find_element(By.ID, "text-submit").click()
    paths, loaded = shown()
    assert paths == [h.entry.path for h in searcher.by_text(TEXT, 6, "infrared")] and loaded
    assert {b.text.split()[0] for b in driver.find_elements(By.CSS_SELECTOR, ".badge")} == {"infrared"}
    driver.save_screenshot(str(tmp_path / "text_query.png"))
    # An infrared image, among the visible images.
    query = sorted(glob.glob(os.path.join(searcher.index.images, "cam3", "*", "*.jpg")))[0]
    driver.find_element(By.ID, "image-file").send_keys(query)
    Select(driver.find_element(By.ID, "image-modality")).select_by_value("infrared")
    Select(driver.find_element(By.ID, "image-gallery")).select_by_value("visible")
    before = driver.find_element(By.ID, "results")
    driver.find_element(By.ID, "image-submit").click()
    wait.until(expected_conditions.staleness_of(before))  # the new page, not the last one
    assert "infrared image → visible images" in driver.find_element(By.ID, "query").text
    paths, loaded = shown()
    want = searcher.by_image(read_image(query), "infrared", 6, "visible")
    assert paths == [h.entry.path for h in want] and loaded
    driver.save_screenshot(str(tmp_path / "image_query.png"))
    # Clicking a result searches with it.
    before = driver.find_element(By.ID, "results")
    driver.find_elements(By.CSS_SELECTOR, "#results .result")[0].click()
    wait.until(expected_conditions.staleness_of(before))
    assert "indexed image" in driver.find_element(By.ID, "query").text
    paths, loaded = shown()
    assert paths == [h.entry.path for h in searcher.by_entry(want[0].index, 6, "visible")]
    driver.save_screenshot(str(tmp_path / "clicked.png"))
    print(f"screenshots in {tmp_path}")
  finally:
    driver.quit()
