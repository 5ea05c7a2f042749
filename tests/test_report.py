"""python -m infusing_jax.report on two tiny trained runs: the page's neighbours and hit
marks against the data, bad input in one line, and the page in a real headless Chromium."""
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import loop
from infusing_jax.training import run_checkpoints
from infusing_jax.training import suite
from tests.helpers import REPO
from tests.helpers import train_world

QUERIES, K = 3, 4
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver (tests/run.sh installs it)


def _report(*args):
    return subprocess.run([sys.executable, "-m", "infusing_jax.report", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """{'naive', 'full': workdir}: two runs of the tiny world that test themselves."""
    out = {}
    for method in ("naive", "full"):
        c = train_world.world_config(world, method, "precomputed", "yes")
        c.train.num_steps = 6
        out[method] = str(tmp_path_factory.mktemp(method))
        loop.train_and_evaluate(c, out[method])
    return out


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    output = tmp_path_factory.mktemp("report")
    result = _report(*runs.values(), f"--output={output}", f"--queries={QUERIES}", f"--k={K}",
                     f"--names={','.join(runs)}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(output / "index.html")
    return output


class _Page(html.parser.HTMLParser):
    """The page's sections: {id: {'kind', 'imgs': [src], 'rows': [{'query': id, model:
    [(image id, class, score, caption or None)]}]}}."""

    def __init__(self):
        super().__init__()
        self.sections, self.imgs = {}, []
        self.section = self.model = self.item = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = self.sections[a["id"]] = dict(kind=a["class"], imgs=[], rows=[])
        elif tag == "img":
            self.imgs.append(a["src"])
            if self.section:
                self.section["imgs"].append(a["src"])
        elif tag == "tr" and self.section:
            self.model = None
        elif tag == "figure" and a["class"] == "query" and self.section:
            self.section["rows"].append({"query": a["data-id"]})
        elif tag == "td" and self.section:
            self.model = a["data-model"]
            self.section["rows"][-1][self.model] = []
        elif tag == "figure" and self.model:
            self.section["rows"][-1][self.model].append(
                (a["data-id"], a["class"], float(a["data-score"]), None))
        elif tag == "li" and self.model:
            self.item = [a["data-id"], a["class"], float(a["data-score"])]

    def handle_data(self, data):
        if self.item is not None:
            self.item.append(data)

    def handle_endtag(self, tag):
        if tag == "li" and self.item:
            image_id, kind, score, *text = self.item
            self.section["rows"][-1][self.model].append((image_id, kind, score, "".join(text)))
            self.item = None
        elif tag == "section":
            self.section = None


def _page(output) -> _Page:
    page = _Page()
    page.feed((output / "index.html").read_text(encoding="utf-8"))
    return page


def _class(image_id: str) -> str:
    """The world's folder sources: an image's id is SPLIT/CLASS/N.jpg."""
    return image_id.split("/")[-2]


def test_the_page_shows_each_models_neighbours_with_hits_marked_by_label(world, runs, report):
    page = _page(report)
    models = ["pretrained", "naive", "full"]
    cfg = train_world.world_config(world, "full", "precomputed", "yes")
    assert list(page.sections) == [*(f"image-{n}" for n in sorted(cfg.eval.retrieval.keys())),
                                   *(f"text-{n}" for n in sorted(cfg.eval.text_retrieval.keys()))]
    # Every image the page shows is a file under --output, beside the plot and the table.
    assert "tradeoff.png" in page.imgs and (report / "comparison.md").exists()
    assert all((report / src).is_file() for src in page.imgs)
    marks = set()
    for name, section in page.sections.items():
        per_query = 1 + len(models) * K if section["kind"] == "image" else 1
        assert len(section["imgs"]) == QUERIES * per_query, name
        assert len(section["rows"]) == QUERIES
        for row in section["rows"]:
            for model in models:
                shown = row[model]
                assert len(shown) == K
                scores = [score for _, _, score, _ in shown]
                assert scores == sorted(scores, reverse=True)
                for item, mark, _, caption in shown:
                    if section["kind"] == "image":  # same class; never the query itself
                        assert item != row["query"]
                        hit = _class(item) == _class(row["query"])
                    else:  # a caption of the image; the world's name their image's class
                        assert _class(item) in caption
                        hit = item == row["query"]
                    assert mark == ("hit" if hit else "miss"), (name, model, item)
                    marks.add(mark)
    assert marks == {"hit", "miss"}  # the check above saw both
    # The pretrained and the naive run's target neighbours, recomputed from all the cosines:
    # each shown one's score is its cosine, and they are the K highest (ties in any order).
    model, pretrained, _ = backbone_lib.load_image_tower(cfg.model)
    towers = dict(pretrained=pretrained,
                  naive=run_checkpoints.kept_backbone(cfg, runs["naive"], pretrained)[1])
    source = suite.source_of(cfg.eval.retrieval.target, cfg, "target")
    split = source.split(source.roles.query)
    embed = backbone_lib.embed_fn(model)
    for name, params in towers.items():
        out = suite.embedded(lambda images: embed(params, images), split, cfg, "target")
        ids = [i.decode() for i in out["ids"]]
        for row in page.sections["image-target"]["rows"]:
            q = ids.index(row["query"])
            scores = out["embeddings"] @ out["embeddings"][q]
            scores[q] = -np.inf
            shown = [score for _, _, score, _ in row[name]]
            np.testing.assert_allclose(
                shown, [scores[ids.index(item)] for item, *_ in row[name]], atol=1e-5)
            np.testing.assert_allclose(shown, np.sort(scores)[::-1][:K], atol=1e-5)


def test_bad_input_is_one_line(world, runs, report, tmp_path):
    def fails(*args, words):
        result = _report(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and lines[-1].startswith("error: "), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        for word in words:
            assert word in lines[-1], lines[-1]

    out = f"--output={tmp_path / 'out'}"
    naive = runs["naive"]
    fails(out, words=["RUN"])
    fails(naive, out, "--queries=0", words=["--queries=0", ">= 1"])
    fails(naive, out, "--k=0", words=["--k=0", ">= 1"])
    fails(str(tmp_path), out, words=["no results"])
    only_results = tmp_path / "only_results"
    only_results.mkdir()
    shutil.copy(os.path.join(naive, "results.json"), only_results)
    fails(str(only_results), out, words=[str(only_results), "not a run's workdir"])
    other = tmp_path / "other_checkpoint"
    shutil.copytree(naive, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["checkpoint"] = os.path.join(world, "elsewhere.npz:img")
    (other / "config.json").write_text(json.dumps(config))
    fails(naive, str(other), out, words=["model.checkpoint", "one pretrained model"])
    # A test set whose images cannot be decoded.
    broken = tmp_path / "broken_set" / "test" / "c0"
    broken.mkdir(parents=True)
    (broken / "0.jpg").write_bytes(b"not a jpeg")
    config = json.loads((other / "config.json").read_text())
    config["model"]["checkpoint"] = json.loads(
        open(os.path.join(naive, "config.json")).read())["model"]["checkpoint"]
    config["eval"]["retrieval"]["target"]["source"] = f"folder:{tmp_path / 'broken_set'}"
    (other / "config.json").write_text(json.dumps(config))
    fails(str(other), out, words=["config.eval.retrieval.target", "no image"])


def test_the_page_loads_from_file_in_headless_chromium(report):
    chromium = shutil.which("chromium")
    assert chromium and os.path.exists(CHROMEDRIVER), (
        "Debian's chromium and chromium-driver are needed (tests/run.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--allow-file-access-from-files", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path given: selenium-manager never looks for one on the network.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get((report / "index.html").as_uri())  # returns after the load event
        loaded = driver.execute_script(
            "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
            ".length")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        screenshot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.quit()
    assert not severe, severe
    assert loaded == len(_page(report).imgs)
    pixels = np.asarray(screenshot)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
