"""Compare runs: a table of their test numbers and the trade-off plot (the paper's Figure 1).

    python -m infusing_jax.compare runs/sop_naive runs/sop_full --output=report/
    python -m infusing_jax.compare sweeps/sop --output=report/      # a sweep's folder

Reads each WORKDIR/results.json (python -m infusing_jax.evaluate, or the end of a
run); a sweep's folder (python -m infusing_jax.sweep) stands for its baseline run and
the trial its best.json chose, and brings its trials' test changes (trials.jsonl):
their Pareto front is drawn through the chosen trial, so sweeps of several methods
(configs/toy_sweep.py:method=...) compare on one plot. Writes to --output:
  comparison.json  {"pretrained": headline, "runs": {run: {"fine-tuned": headline,
                   "change": headline - pretrained, "wise_ft": [{"alpha", ...}]}}}
  comparison.md    the same as a markdown table (changes in points, x100)
  summary.json     {"pretrained": headline, run: its fine-tuned headline, ...}
  tradeoff.png     in-domain retrieval gain (y) against the out-of-domain change (x):
                   image->image (left) and image<->text (right); WiSE-FT curves as lines
                   (runs evaluated at alphas between 0 and 1),
                   a sweep's trials as dots and their Pareto front as a dotted line,
                   evaluate's post-hoc models (LiNeS, soups, Model Stock) as crosses
Changes are against each run's own pretrained numbers.
"""
import json
import os

from absl import flags

from infusing_jax import cli
from infusing_jax import errors
from infusing_jax.hpo import report as report_lib

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("output", None, "Directory for comparison.{json,md} and tradeoff.png.")
    flags.DEFINE_list("names", None, "Run names (default: the workdirs' basenames).")
    flags.mark_flag_as_required("output")


# evaluate's post-hoc models besides WiSE-FT (evaluation/merging.py), drawn as crosses.
POST_HOC = ("lines", "uniform_soup", "greedy_soup", "model_stock")
COLUMNS = ("in_domain_r1", "in_domain_map{k}", "generic_r1", "generic_map{k}",
           "image_to_text_r1", "text_to_image_r1", "zero_shot_top1")


def _load(workdir: str) -> dict:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        raise errors.UserError(f"{path}: no results; run python -m infusing_jax.evaluate first")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise errors.UserError(f"{path}: cannot read it as JSON ({e}); write it again with "
                               "python -m infusing_jax.evaluate") from None
    if not isinstance(results, dict) or not isinstance(results.get("models"), dict):
        raise errors.UserError(f"{path}: not a results.json (no 'models'); write it again with "
                               "python -m infusing_jax.evaluate")
    if "fine-tuned" not in results["models"]:
        raise errors.UserError(f"{path}: has no fine-tuned model (a --checkpoint evaluation?)")
    return results


def _change(a: dict, b: dict) -> dict:
    """a - b per key, None where either is missing."""
    return {k: None if a.get(k) is None or b.get(k) is None else a[k] - b[k] for k in a}


def _text(headline: dict):
    """The mean of image->text and text->image R@1 (the plot's image<->text axis)."""
    values = [headline.get(k) for k in ("image_to_text_r1", "text_to_image_r1")]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _trial_changes(sweep: str) -> list:
    """The test change from the pretrained model of each complete trial of a sweep
    (trials.jsonl), the test numbers that never chose."""
    path = os.path.join(sweep, "trials.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            test = row.get("test") or {}
            if row.get("state") == "complete" and test.get("fine-tuned") and test.get(
                    "pretrained"):
                out.append(_change(test["fine-tuned"], test["pretrained"]))
    return out


def _config_text(workdir):
    """The run's config.json, as text, or None where it has none."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return f.read()
    except (OSError, TypeError):
        return None


def expand_sweeps(workdirs) -> tuple:
    """-> (workdirs, names, trials): a sweep's folder (it has best.json) becomes its
    baseline run and its chosen trial, named '<sweep>/baseline' and '<sweep>/trial N'
    (a baseline trained with the config of one listed before is listed once: method
    sweeps share theirs); trials: {chosen trial's name: every complete trial's test
    change}."""
    runs, names, trials, baselines = [], [], {}, set()
    for workdir in workdirs:
        best_path = os.path.join(workdir, "best.json")
        base = os.path.basename(os.path.normpath(workdir))
        if not os.path.exists(best_path):
            runs.append(workdir)
            names.append(base)
            continue
        try:
            with open(best_path) as f:
                best = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise errors.UserError(f"{best_path}: cannot read it ({e}); let the sweep "
                                   "rewrite it (run its command again)") from None
        baseline = best.get("baseline") or {}
        config = _config_text(baseline.get("workdir"))
        if baseline and (config is None or config not in baselines):
            runs.append(baseline["workdir"])
            names.append(f"{base}/baseline")
            baselines.add(config)
        runs.append(best["workdir"])
        names.append(f"{base}/trial {best['trial']}")
        trials[names[-1]] = _trial_changes(workdir)
    return runs, names, trials


def comparison(workdirs, names=None) -> dict:
    workdirs, default_names, trials = expand_sweeps(workdirs)
    names = names or default_names
    if len(names) != len(workdirs):
        raise errors.UserError(f"--names: {len(names)} names for {len(workdirs)} runs "
                               f"({', '.join(default_names)})")
    out = {"pretrained": None, "runs": {}}
    for name, default, workdir in zip(names, default_names, workdirs):
        results = _load(workdir)
        pretrained = results["models"]["pretrained"]["headline"]
        out["pretrained"] = out["pretrained"] or pretrained
        finetuned = results["models"]["fine-tuned"]["headline"]
        out["runs"][name] = dict(
            workdir=workdir, step=results.get("step"), **{"fine-tuned": finetuned},
            change=_change(finetuned, pretrained),
            wise_ft=[dict(alpha=p["alpha"], change=_change(
                {k: v for k, v in p.items() if k != "alpha"}, pretrained))
                for p in results.get("wise_ft", [])])
        if default in trials:
            out["runs"][name]["trials"] = trials[default]
        post_hoc = {m: _change(r["headline"], pretrained)
                    for m, r in results["models"].items() if m.split("@")[0] in POST_HOC}
        if post_hoc:
            out["runs"][name]["post_hoc"] = post_hoc
    return out


def summary(report: dict) -> dict:
    """{'pretrained': headline, run: fine-tuned headline}: each model's test numbers."""
    return {"pretrained": report["pretrained"],
            **{name: run["fine-tuned"] for name, run in report["runs"].items()}}


def _k(headline: dict) -> int:
    key = next(k for k in headline if k.startswith("in_domain_map"))
    return int(key[len("in_domain_map"):])


def markdown(report: dict) -> str:
    k = _k(report["pretrained"])
    cols = [c.format(k=k) for c in COLUMNS]
    fmt = lambda v, sign="": "–" if v is None else f"{100 * v:{sign}.1f}"  # noqa: E731
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| pretrained | " + " | ".join(fmt(report["pretrained"].get(c)) for c in cols) + " |"]
    for name, run in report["runs"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{fmt(run['fine-tuned'].get(c))} ({fmt(run['change'].get(c), '+')})"
            for c in cols) + " |")
    return ("Test numbers x100; in brackets the change from the pretrained model.\n\n"
            + "\n".join(lines) + "\n")


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = _k(report["pretrained"])
    y_key, x_image = f"in_domain_map{k}", f"generic_map{k}"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    axes_x = ((axes[0], lambda c: c.get(x_image), f"out-of-domain image->image mAP@{k} change"),
              (axes[1], _text, "image<->text R@1 change (mean of both directions)"))
    # one colour per run for its point, its WiSE-FT curve, its trials and its post-hoc models
    palette = plt.get_cmap("tab10" if len(report["runs"]) <= 10 else "tab20")
    colours = {name: palette(i % palette.N) for i, name in enumerate(report["runs"])}
    for ax, x_of, label in axes_x:
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.plot([0], [0], "ko")
        ax.annotate("pretrained", (0, 0), textcoords="offset points", xytext=(4, -10))
        for name, run in report["runs"].items():
            colour = colours[name]
            curve = [(x_of(p["change"]), p["change"].get(y_key)) for p in run["wise_ft"]]
            curve = [(100 * x, 100 * y) for x, y in curve if x is not None and y is not None]
            if any(0 < p["alpha"] < 1 for p in run["wise_ft"]) and len(curve) > 1:
                ax.plot(*zip(*curve), "-", color=colour, alpha=0.5, lw=1)
            x, y = x_of(run["change"]), run["change"].get(y_key)
            if x is None or y is None:
                continue
            ax.plot([100 * x], [100 * y], "o", color=colour, label=name,
                    markeredgecolor="k", markeredgewidth=0.5)
            dots = [(100 * x_of(c), 100 * c[y_key]) for c in run.get("trials", [])
                    if x_of(c) is not None and c.get(y_key) is not None]
            if dots:
                ax.plot(*zip(*dots), ".", color=colour, alpha=0.35)
                ax.plot(*zip(*report_lib.pareto_front(dots)), ":", color=colour, lw=1.2)
            for model, c in run.get("post_hoc", {}).items():
                if x_of(c) is not None and c.get(y_key) is not None:
                    ax.plot([100 * x_of(c)], [100 * c[y_key]], "x", color=colour)
                    ax.annotate(model, (100 * x_of(c), 100 * c[y_key]), fontsize=7,
                                textcoords="offset points", xytext=(3, -8))
        ax.set_xlabel(label)
    axes[0].set_ylabel(f"in-domain mAP@{k} gain")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # a legend below, not labels on the points: method sweeps bunch together
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 5) if handles else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, folder: str) -> None:
    """comparison.json, summary.json, comparison.md and tradeoff.png into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "comparison.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary(report), f, indent=2)
    with open(os.path.join(folder, "comparison.md"), "w") as f:
        f.write(markdown(report))
    plot(report, os.path.join(folder, "tradeoff.png"))


def main(argv):
    workdirs = argv[1:]
    if not workdirs:
        raise errors.UserError("WORKDIR: give one or more run workdirs")
    cli.check_folder("--output", FLAGS.output)
    report = comparison(workdirs, FLAGS.names)
    write(report, FLAGS.output)
    print(markdown(report))


if __name__ == "__main__":
    cli.run(main, define_flags)
