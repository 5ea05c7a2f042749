r"""A retrieval report to look at: a static HTML page of what the models retrieve.

    python -m infusing_jax.report runs/sop_naive runs/sop_full --output=report/
        [--queries=8] [--k=5] [--seed=0] [--names=naive,full]

RUN: the workdirs of runs of python -m infusing_jax.main, each with its results.json
(or a sweep's folder, as for compare); all of one pretrained checkpoint. The test sets
are the first run's (eval.retrieval and eval.text_retrieval of its config.json).

  image->image  per test set, --queries queries sampled (--seed; the same for every
                model), each with its top --k index images under the pretrained model
                and under each run's kept model (train.select_by's checkpoint), side by
                side; each neighbour is marked a hit (same label: green, ✓) or a miss
                (red, ✗), with its cosine. As in the evaluation, a query never
                retrieves an index image with its own id (itself).
  image<->text  per test set, --queries images, each with its top --k captions under
                every model (the frozen text tower's embeddings, as the evaluation's);
                the image's own captions are the hits. Sets with a text_embeddings file
                (no caption strings) are left out.

Writes to --output:
  index.html          the page; opens from file:// (no server, network or script)
  images/KIND-SET/H.png  each image shown, at most THUMBNAIL px a side (KIND: image or
                      text; H: a hash of its id)
  comparison.json, comparison.md, summary.json, tradeoff.png
                      as compare writes them; the page shows the table and the plot
Runs in one process, on its devices.
"""
import dataclasses
import functools
import hashlib
import html
import io
import os
import shutil

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging
from PIL import Image

from infusing_jax import cli
from infusing_jax import compare
from infusing_jax import convert
from infusing_jax import errors
from infusing_jax.data import pil_views
from infusing_jax.data import tf_views
from infusing_jax.evaluation import embedding
from infusing_jax.evaluation import knn
from infusing_jax.training import backbone as backbone_lib
from infusing_jax.training import run_checkpoints
from infusing_jax.training import suite

FLAGS = flags.FLAGS

THUMBNAIL = 128  # px, the longer side of a shown image
QUERIES, K = 8, 5  # the flags' defaults: queries per test set, neighbours per model
PRETRAINED = "pretrained"  # the first column's model


def define_flags():
    flags.DEFINE_string("output", None, "Directory for index.html, images/ and compare's "
                        "files.")
    flags.DEFINE_list("names", None, "Run names (default: the workdirs' basenames).")
    flags.DEFINE_integer("queries", QUERIES, "Queries (images) sampled per test set.")
    flags.DEFINE_integer("k", K, "Neighbours (captions) shown per query and model.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampled queries.")
    flags.mark_flag_as_required("output")


@dataclasses.dataclass(frozen=True)
class Shown:
    """One retrieved item, an image (`image`: its thumbnail, relative to --output) or a
    caption: its cosine with the query, whether it is a hit, and the id of its image."""
    score: float
    hit: bool
    image_id: str
    image: str = ""
    caption: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    """A query (its thumbnail and id) and {model: its top-k Shown, best first}."""
    image: str
    query_id: str
    results: dict


@dataclasses.dataclass(frozen=True)
class Section:
    """One test set's table: kind 'image' (image->image) or 'text' (image->text); anchor:
    KIND-NAME, its id in the page and its thumbnails' folder under images/."""
    anchor: str
    name: str
    kind: str
    about: str
    rows: list


# ---------------------------------------------------------------- the runs and models


def run_configs(runs: dict) -> dict:
    """{name: workdir} -> {name: the run's config (config.json)}; one UserError for a
    folder that is not a run's workdir, or runs of different pretrained models."""
    configs = {}
    for name, workdir in runs.items():
        if not convert.is_run(workdir):
            raise errors.UserError(f"{workdir}: not a run's workdir (no config.json beside "
                                   "checkpoints/ or best/); give workdirs of python -m "
                                   "infusing_jax.main")
        configs[name] = ml_collections.ConfigDict(
            run_checkpoints.read_json(os.path.join(workdir, "config.json")))
    first_name, first = next(iter(configs.items()))
    for name, cfg in configs.items():
        for field in ("checkpoint", "family", "image_size"):
            if cfg.model[field] != first.model[field]:
                raise errors.UserError(
                    f"{os.path.join(runs[name], 'config.json')}: model.{field} is "
                    f"{cfg.model[field]!r}, {runs[first_name]}'s {first.model[field]!r}; "
                    "report runs of one pretrained model together")
    return configs


def encoders(configs: dict, runs: dict) -> dict:
    """-> {'pretrained', then each run's name: images (B, S, S, 3) -> embeddings (B, E)}:
    the pretrained image tower and the one each run keeps."""
    first = next(iter(configs.values()))
    model, pretrained, _ = backbone_lib.load_image_tower(first.model)
    towers = {PRETRAINED: pretrained}
    for name, cfg in configs.items():
        towers[name] = run_checkpoints.kept_backbone(cfg, runs[name], pretrained)[1]
    embed = jax.jit(backbone_lib.embed_fn(model))
    device = jax.local_devices()[0]
    return {name: functools.partial(embed, jax.device_put(params, device))
            for name, params in towers.items()}


def sample(count: int, queries: int, seed: int) -> np.ndarray:
    """`queries` of range(count) (all of them where fewer), sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(queries, count), replace=False))


# ---------------------------------------------------------------- thumbnails


def thumbnail_path(folder: str, image_id) -> str:
    """images/FOLDER/HASH.png, relative to --output: ids may hold any characters."""
    digest = hashlib.sha1(str(image_id).encode()).hexdigest()[:16]
    return f"images/{folder}/{digest}.png"


def clear_thumbnails(folder: str, output: str) -> None:
    """An empty output/images/FOLDER (a test set's thumbnails of an earlier report gone)."""
    path = os.path.join(output, "images", folder)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def write_thumbnails(split, ids, folder: str, output: str) -> None:
    """The images of `split` with these ids, downscaled to at most THUMBNAIL px a side,
    to output/thumbnail_path(folder, id) as PNG."""
    if not ids:
        return
    wanted = tf.constant(sorted(set(ids)))
    ds = split.dataset(0, 1).map(lambda ex: (ex["id"], ex["image"]))
    # Only shown images are decoded; a file that cannot be read is one the test skipped.
    ds = ds.filter(lambda image_id, _: tf.reduce_any(image_id == wanted)).ignore_errors()
    for image_id, data in ds.as_numpy_iterator():
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = pil_views.to_rgb(image)  # 16-bit scaled, alpha on white: as tf_views
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        image.save(os.path.join(output, thumbnail_path(folder, image_id.decode())))


def _id(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- the test sets


def _embedded(encode, split, cfg, where: str) -> dict:
    """suite's embedding of a split; a split with no image is the test set's error."""
    try:
        return suite.embedded(encode, split, cfg, where)
    except errors.UserError as e:
        raise errors.UserError(f"config.eval.{where}: {e}; give a test set with images") \
            from None


def retrieval_section(cfg, name: str, encode: dict, queries: int, k: int, seed: int,
                      output: str) -> Section:
    """Image->image test set `name`: sampled queries and their top-k under each model."""
    # suite's own reading of its test sets
    t, where = cfg.eval.retrieval[name], f"retrieval.{name}"
    source = suite.source_of(t, cfg, where)
    q_name = t.query_split or source.roles.query
    i_name = t.index_split or source.roles.index
    q_split = suite.split_of(source, q_name, where + ".query_split")
    i_split = suite.split_of(source, i_name, where + ".index_split")
    rows, picked = None, {}
    for model, enc in encode.items():
        q = _embedded(enc, q_split, cfg, where)
        i = q if i_name == q_name else _embedded(enc, i_split, cfg, where)
        rows = sample(len(q["ids"]), queries, seed) if rows is None else rows
        scores, neighbours = knn.knn(q["embeddings"][rows], i["embeddings"], k,
                                     query_ids=q["ids"][rows], index_ids=i["ids"])
        picked[model] = scores, neighbours
    query_ids = [_id(v) for v in q["ids"][rows]]
    shown = {q_name: set(query_ids)}
    shown.setdefault(i_name, set()).update(
        _id(i["ids"][n]) for _, found in picked.values() for n in found.ravel() if n >= 0)
    folder = f"image-{name}"
    clear_thumbnails(folder, output)
    for split_name, ids in shown.items():
        write_thumbnails(source.split(split_name), ids, folder, output)
    table = []
    for r, (row, query_id) in enumerate(zip(rows, query_ids)):
        results = {}
        for model, (scores, neighbours) in picked.items():
            results[model] = [
                Shown(float(s), bool(i["labels"][n] == q["labels"][row]), _id(i["ids"][n]),
                      thumbnail_path(folder, _id(i["ids"][n])))
                for s, n in zip(scores[r], neighbours[r]) if n >= 0]
        table.append(Row(thumbnail_path(folder, query_id), query_id, results))
    about = (f"image->image: {len(rows)} queries of split {q_name}, their top {k} in split "
             f"{i_name}{' (the query itself left out)' if i_name == q_name else ''}; a hit "
             "is an image of the query's class")
    return Section(folder, name, "image", about, table)


def text_section(cfg, name: str, encode: dict, texts, queries: int, k: int, seed: int,
                 output: str) -> Section:
    """Image<->text test set `name`: sampled images and their top-k captions under each
    model."""
    t, where = cfg.eval.text_retrieval[name], f"text_retrieval.{name}"
    split = suite.text_split_of(t, cfg, where)
    view = tf_views.eval_fn(cfg.model.family, cfg.model.image_size)
    rows = captions = owner = text_embeddings = None
    picked = {}
    for model, enc in encode.items():
        out = embedding.embed_split(enc, split, view, batch_size=cfg.eval.batch_size,
                                    columns=("captions", "id"), desc=name)
        if not len(out.embeddings):
            raise errors.UserError(f"config.eval.{where}: split {split.name}: no image could "
                                   "be decoded; give a test set with images")
        if rows is None:
            rows = sample(len(out.embeddings), queries, seed)
            all_ids = [_id(v) for v in out.columns["id"]]
            ids = [all_ids[row] for row in rows]
            captions = [c for row in out.columns["captions"] for c in row]
            owner = np.repeat(np.arange(len(out.embeddings)),
                              [len(row) for row in out.columns["captions"]])
            text_embeddings = texts.embed_texts(captions)
        picked[model] = knn.knn(out.embeddings[rows], text_embeddings, k)
    folder = f"text-{name}"
    clear_thumbnails(folder, output)
    write_thumbnails(split, ids, folder, output)
    table = []
    for r, (row, image_id) in enumerate(zip(rows, ids)):
        results = {model: [Shown(float(s), bool(owner[j] == row), all_ids[owner[j]],
                                 caption=captions[j])
                           for s, j in zip(scores[r], best[r]) if j >= 0]
                   for model, (scores, best) in picked.items()}
        table.append(Row(thumbnail_path(folder, image_id), image_id, results))
    about = (f"image->text: {len(rows)} images of split {split.name}, their top {k} of the "
             f"{len(captions)} captions; a hit is one of the image's own captions")
    return Section(folder, name, "text", about, table)


def sections(cfg, encode: dict, queries: int, k: int, seed: int, output: str) -> list:
    """Every image->image, then every image<->text test set of `cfg`, by name."""
    out = [retrieval_section(cfg, name, encode, queries, k, seed, output)
           for name in sorted(cfg.eval.retrieval.keys())]
    text_sets = sorted(cfg.eval.text_retrieval.keys())
    for name in text_sets:
        if cfg.eval.text_retrieval[name].text_embeddings:
            logging.warning("report: text set %s has a text_embeddings file and no caption "
                            "strings; left out", name)
    text_sets = [n for n in text_sets if not cfg.eval.text_retrieval[n].text_embeddings]
    texts = suite.load_text_side(cfg) if text_sets else None
    return out + [text_section(cfg, name, encode, texts, queries, k, seed, output)
                  for name in text_sets]


# ---------------------------------------------------------------- the page


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { vertical-align: top; padding: 6px; border-top: 1px solid #ccc; text-align: left; }
figure { display: inline-block; margin: 2px; text-align: center; font-size: 12px; }
figure img { display: block; max-width: 128px; max-height: 128px; border: 4px solid #fff; }
figure.query img { border-color: #888; }
figure.hit img { border-color: #1a8f2e; }
figure.miss img { border-color: #d12f2f; }
.hit { color: #1a6f26; } .miss { color: #b01f1f; }
ol { margin: 0; padding-left: 1.4em; font-size: 13px; max-width: 28em; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
"""


def _mark(shown: Shown) -> str:
    return "✓" if shown.hit else "✗"


def _figure(kind: str, image: str, image_id: str, caption: str, score=None) -> str:
    score_attr = "" if score is None else f' data-score="{score:.6f}"'
    return (f'<figure class="{kind}" data-id="{html.escape(image_id)}"{score_attr}>'
            f'<img src="{html.escape(image)}" alt="{html.escape(image_id)}" '
            f'title="{html.escape(image_id)}"><figcaption>{caption}</figcaption></figure>')


def _cell(section: Section, shown: list) -> str:
    if section.kind == "image":
        return "".join(_figure("hit" if s.hit else "miss", s.image, s.image_id,
                               f"{_mark(s)} {s.score:.3f}", s.score) for s in shown)
    return "<ol>" + "".join(
        f'<li class="{"hit" if s.hit else "miss"}" data-id="{html.escape(s.image_id)}" '
        f'data-score="{s.score:.6f}" title="{html.escape(s.image_id)}">{_mark(s)} '
        f"{s.score:.3f} {html.escape(s.caption)}</li>" for s in shown) + "</ol>"


def section_html(section: Section, models: list) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    rows = "".join(
        f'<tr><th>{_figure("query", row.image, row.query_id, "query")}</th>'
        + "".join(f'<td data-model="{html.escape(m)}">{_cell(section, row.results[m])}</td>'
                  for m in models) + "</tr>" for row in section.rows)
    return (f'<section class="{section.kind}" id="{html.escape(section.anchor)}">'
            f"<h2>{html.escape(section.name)}</h2><p>{html.escape(section.about)}</p>"
            f"<table><tr><th>query</th>{head}</tr>{rows}</table></section>")


def page(runs: dict, section_list: list, table_markdown: str) -> str:
    """index.html: the runs, the results table and trade-off plot, then each test set."""
    models = [PRETRAINED, *runs]
    listed = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(w)}</li>"
                     for n, w in runs.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Retrieval report</title><style>{STYLE}</style></head><body>"
            f"<h1>Retrieval report</h1><ul>{listed}</ul>"
            f'<h2>Test results</h2><img src="tradeoff.png" alt="the trade-off plot" '
            f'style="max-width:100%"><pre>{html.escape(table_markdown)}</pre>'
            + "".join(section_html(s, models) for s in section_list) + "</body></html>\n")


def main(argv):
    workdirs = argv[1:]
    if not workdirs:
        raise errors.UserError("RUN: give one or more run workdirs")
    for flag in ("queries", "k"):
        if FLAGS[flag].value < 1:
            raise errors.UserError(f"--{flag}={FLAGS[flag].value}: must be >= 1")
    if "://" in FLAGS.output:
        raise errors.UserError(f"--output={FLAGS.output}: the report is written to a local "
                               "folder; copy it to the bucket after (gsutil -m cp -r)")
    cli.check_folder("--output", FLAGS.output)
    table = compare.comparison(workdirs, FLAGS.names)
    runs = {name: run["workdir"] for name, run in table["runs"].items()}
    if PRETRAINED in runs:
        raise errors.UserError(f"--names: {PRETRAINED!r} is the pretrained model's column; "
                               "name the run otherwise")
    configs = run_configs(runs)
    cfg = next(iter(configs.values()))
    if not (cfg.eval.retrieval.keys() or cfg.eval.text_retrieval.keys()):
        raise errors.UserError(f"{os.path.join(next(iter(runs.values())), 'config.json')}: no "
                               "image->image or image<->text test set (eval.retrieval, "
                               "eval.text_retrieval); nothing to show")
    section_list = sections(cfg, encoders(configs, runs), FLAGS.queries, FLAGS.k, FLAGS.seed,
                            FLAGS.output)
    compare.write(table, FLAGS.output)
    path = os.path.join(FLAGS.output, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page(runs, section_list, compare.markdown(table)))
    logging.info("report: wrote %s, images/ (%d test sets) and compare's files to %s", path,
                 len(section_list), FLAGS.output)
    print(path)


if __name__ == "__main__":
    cli.run(main, define_flags)
