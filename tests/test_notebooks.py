"""The Colab notebooks under colab/, executed on tiny settings with nbclient.

The kernel is this interpreter, through a kernel spec written under tmp_path and found
through JUPYTER_PATH: nothing needs registering (`pip install -e .[test]` is enough).
Each notebook's "parameters" cell is followed by an injected cell with the tiny values,
as papermill does. colab/finetune_siglip.ipynb needs a TPU / GPU and downloads: it is
only checked to be valid Python here.
"""
import ast
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
COLAB = REPO / "colab"
KERNEL = "infusing-jax-tests"
CELL_TIMEOUT = 1800  # seconds per cell: fine-tuning cells on a loaded 2-core machine
TINY_WORLD = dict(GENERIC_TRAIN=600, GENERIC_TEST=200, TARGET_CLASSES="8,3,4",
                  TARGET_PER_CLASS="8,4,5")
HEADLINE = {"in_domain_r1", "in_domain_map20", "generic_r1", "generic_map20",
            "image_to_text_r1", "text_to_image_r1", "zero_shot_top1"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernel spec for this interpreter under tmp_path; Jupyter's files kept there too."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    return KERNEL


def _read(name: str):
    return nbformat.read(COLAB / name, as_version=4)


def _parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"want one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _assigned(source: str) -> set:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def execute(name: str, params: dict, kernel: str, out_dir: Path):
    """Runs colab/NAME with `params` injected after its parameters cell; -> (notebook, s).
    The executed notebook is written to out_dir whether or not it fails."""
    nb = _read(name)
    at = _parameters_cell(nb)
    unknown = set(params) - _assigned(nb.cells[at].source)
    assert not unknown, f"{name}: no parameters {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel,
                            resources={"metadata": {"path": str(COLAB)}})
    start = time.monotonic()
    try:
        client.execute()
    finally:
        nbformat.write(nb, out_dir / name)
    seconds = time.monotonic() - start
    print(f"{name}: executed in {seconds:.0f} s")
    return nb, seconds


def _outputs(nb, kind: str) -> list:
    """Every output of the notebook with a `kind` mime type (or stream text for 'stream')."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stream" and out.output_type == "stream":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out.data[kind])
    return found


def test_every_notebook_is_valid_and_has_a_parameters_cell():
    for name in ("quickstart.ipynb", "finetune_siglip.ipynb", "export_to_pytorch.ipynb"):
        nb = _read(name)
        nbformat.validate(nb)
        assert _assigned(nb.cells[_parameters_cell(nb)].source), name
        for cell in nb.cells:
            if cell.cell_type == "code":
                # IPython's ! and % lines are not Python; the rest must parse.
                lines = [ln for ln in cell.source.splitlines()
                         if not ln.lstrip().startswith(("!", "%"))]
                ast.parse("\n".join(lines), filename=f"{name}:{cell.id}")
            assert not cell.get("outputs"), f"{name}: cell {cell.id} is saved with outputs"


def test_quickstart_notebook_compares_naive_and_full_fine_tuning(kernel, tmp_path):
    workdir = tmp_path / "quickstart"
    nb, _ = execute("quickstart.ipynb", dict(WORKDIR=str(workdir), PRETRAIN_STEPS=40,
                                             FINETUNE_STEPS=20, **TINY_WORLD), kernel, tmp_path)
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"pretrained", "naive", "full"}
    for model, numbers in summary.items():
        assert set(numbers) == HEADLINE, model
        for key, value in numbers.items():
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (model, key, value)
    for method in ("naive", "full"):
        results = json.loads((workdir / method / "results.json").read_text())
        assert results["step"] == 20, method
    assert (workdir / "world" / "vlm" / "pretrained.npz").exists()
    assert (workdir / "tradeoff.png").read_bytes()[:8] == PNG
    table = (workdir / "comparison.md").read_text()
    assert "| naive |" in table and "| full |" in table and "| pretrained |" in table
    # What the notebook shows: the comparison, the summary table, the plot, the claim check.
    shown = "\n".join(_outputs(nb, "text/markdown"))
    assert "| naive |" in shown and "summary.json (x100)" in shown
    assert len(_outputs(nb, "image/png")) == 1
    assert "raises in-domain R@1" in "".join(_outputs(nb, "stream"))


def test_export_notebook_matches_jax_and_pytorch_embeddings(kernel, tmp_path):
    workdir = tmp_path / "export"
    nb, _ = execute("export_to_pytorch.ipynb", dict(WORKDIR=str(workdir), RUN="",
                                                    PRETRAIN_STEPS=20, FINETUNE_STEPS=10,
                                                    NUM_IMAGES=16, **TINY_WORLD),
                    kernel, tmp_path)
    export = workdir / "export_hf"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(
        os.listdir(export))
    assert json.loads((export / "config.json").read_text())["architectures"] == ["SiglipModel"]
    agreement = json.loads((workdir / "agreement.json").read_text())
    assert agreement["family"] == "siglip" and agreement["num_images"] == 16
    assert agreement["export"] == str(export)
    for key in ("max_abs_diff", "vision_only_max_abs_diff", "end_to_end_max_abs_diff",
                "text_max_abs_diff"):
        assert agreement[key] < 1e-4, (key, agreement[key])
    assert agreement["min_cosine"] > 0.9999 and agreement["end_to_end_min_cosine"] > 0.9999
    assert agreement["pixel_max_abs_diff"] < 1e-5  # the same preprocessing on both sides
    assert 0.0 <= agreement["zero_shot_top1"] <= 1.0
    assert "JAX and PyTorch agree" in "".join(_outputs(nb, "stream"))
