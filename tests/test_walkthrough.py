"""README's "Fine-tune on your own images", run as written on a generated folder dataset:
embed, search, fine-tune with configs/custom.py (naive and full, unlabelled generic
images), evaluate, compare, report, export, and search with the exported model."""
import json
import os
import re
import subprocess
import sys

import numpy as np

from tests.helpers import train_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Fine-tune on your own images"


def readme_steps() -> str:
    """The section's bash block."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert SECTION in text
    block = re.search(r"```bash\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    return block.group(1)


def with_values(script: str, values: dict) -> str:
    """The script with its `NAME=...` lines for `values`' names set to them."""
    lines = script.splitlines()
    for name, value in values.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{name}=")]
        assert len(at) == 1, name  # the README still sets each variable once
        lines[at[0]] = f"{name}={value}"
    return "\n".join(lines) + "\n"


def _search(output: str) -> list:
    return [line.split("\t") for line in output.splitlines() if re.match(r"\d+\t", line)]


def test_the_readme_walkthrough_runs_on_a_generated_folder(tmp_path):
    world = train_world.make_world(str(tmp_path / "data"))
    with open(f"{world}/generic/train/broken.jpg", "wb") as f:  # counted, named, skipped
        f.write(b"not a jpeg")
    runs = tmp_path / "runs"
    query = "c4v/0.jpg"  # a test class of the generated target
    script = with_values(readme_steps(), dict(
        PHOTOS=f"{world}/target", GENERIC=f"{world}/generic/train",
        CKPT=f"{world}/pretrained.npz", TOKENIZER=f"{world}/spm.model",
        QUERY=f"{world}/target/test/{query}", RUNS=str(runs),
        OPTIONS=f"image_size=32,batch_size=8,epochs=2,evals=2,keep=last,distill=100.0,anchor=10.0,"
                f"captions={world}/captions.json"))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]

    # search, before and after: the query photo finds itself first, at cosine 1
    before, after = _search(run.stdout)[:5], _search(run.stdout)[5:]
    for found in (before, after):
        assert [r[0] for r in found] == ["1", "2", "3", "4", "5"] and found[0][2] == query
        assert abs(float(found[0][1]) - 1) < 1e-4
    index = {n: np.load(runs / f"{n}.npz")["image_embeddings"] for n in ("before", "after")}
    assert index["before"].shape == index["after"].shape == (16, 32)
    assert np.abs(index["before"] - index["after"]).max() > 1e-3  # the fine-tuned model

    # both runs trained on the target; the full one distilled on the unlabelled images,
    # validated by their retention
    for method in ("naive", "full"):
        results = json.loads((runs / method / "results.json").read_text())
        assert {"pretrained", "fine-tuned"} <= set(results["models"])
        headline = results["models"]["fine-tuned"]["headline"]
        assert headline["in_domain_r1"] is not None and headline["image_to_text_r1"] is not None
    full = json.loads((runs / "full" / "train_summary.json").read_text())
    assert full["domains"] == ["target", "generic"] and full["num_steps"] > 0
    assert 0 < full["val"]["generic/retention"] <= 1 + 1e-6
    assert "generic/map@20" not in full["val"]
    assert full["skipped"]["generic"] >= 1  # broken.jpg, not held out: trained on, skipped
    assert "teacher generic: 1 undecodable images skipped: broken.jpg" in run.stderr
    assert "wise_ft@0.5" in json.loads((runs / "full" / "results.json").read_text())["models"]
    assert (runs / "compare" / "tradeoff.png").stat().st_size > 0
    assert (runs / "report" / "index.html").stat().st_size > 0
