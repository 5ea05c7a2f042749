"""What a sweep leaves in its folder, rewritten after every trial by process 0:

  trials.jsonl  one JSON object per trial: number, state, params (field path -> value),
                values (objective -> value), step (steps trained), seconds, workdir;
                also val (the kept weights' validation metrics), test (the test
                headlines, never used to choose), error, retry_of
  best.json     the trial the paper's rule picks (choose()), its test numbers and their
                change from the pretrained model, beside the baseline's
  pareto.png    every trial's in-domain val gain against its out-of-domain val change
                from the pretrained model, the Pareto front of the two, the pretrained
                model and the baseline with its WiSE-FT curve
  table.md      the same as a Markdown table: each trial's values, its val scores and
                its test change from the pretrained model (its in-domain gain also as
                a fraction of the baseline's), under the pretrained model and baseline
and one progress line per finished trial (stderr).

The paper's rule: the highest validation 'all', the mean of the in-domain and the
out-of-domain val mAP@k (train.select_by 'all'); a sweep without one of the two
picks by its first objective.
"""
import json
import os
import sys
import uuid
from typing import Optional

from infusing_jax.hpo import reference as reference_lib
from infusing_jax.hpo import study as study_lib
from infusing_jax.training import run_checkpoints

RULE = "all"


def rows(trials, objectives) -> list:
    """trials.jsonl's rows, by number; skipped trials (never run) are left out."""
    out = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.user_attrs.get("skipped"):
            continue
        seconds = None
        if t.datetime_start and t.datetime_complete:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        values = None
        if t.values is not None:
            values = dict(zip(objectives, t.values))
        retried_as = [u.number for u in trials
                      if t.number in study_lib.RETRY.retry_history(u)]
        out.append(dict(
            number=t.number, state=t.state.name.lower(), params=t.user_attrs.get("params", {}),
            values=values, step=t.user_attrs.get("steps"), seconds=seconds,
            workdir=t.user_attrs.get("workdir"), val=t.user_attrs.get("val"),
            test=t.user_attrs.get("test"), error=t.user_attrs.get("error"),
            worker=t.user_attrs.get("worker"), retry_of=study_lib.RETRY.retried_trial_number(t),
            retried_as=retried_as[0] if retried_as else None))
    return out


def choose(table: list, objectives) -> Optional[dict]:
    """The complete trial with the highest val 'all' (or first objective, see module doc)."""
    done = [r for r in table if r["state"] == "complete" and r["val"]]
    key = RULE if any(RULE in r["val"] for r in done) else objectives[0]
    scored = [r for r in done if key in r["val"]]
    return max(scored, key=lambda r: r["val"][key]) if scored else None


def _change(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    if not a or not b:
        return None
    return {k: None if a.get(k) is None or b.get(k) is None else a[k] - b[k] for k in a}


def _test_change(test: Optional[dict]) -> Optional[dict]:
    return _change((test or {}).get("fine-tuned"), (test or {}).get("pretrained"))


def best_report(best: dict, reference: Optional[dict], k: int, test_k: int) -> dict:
    """best.json: the chosen trial, its test change, and beside the baseline's (k: the
    val kNN's, train.eval_k; test_k: the test sets', eval.k)."""
    out = dict(rule=f"the highest validation '{RULE}' (the mean of the in-domain and the "
                    f"out-of-domain val mAP@{k})", trial=best["number"], params=best["params"],
               val=best["val"], workdir=best["workdir"], test=best["test"],
               change=_test_change(best["test"]))
    baseline = (reference or {}).get("baseline")
    if baseline:
        mine, theirs = out["change"] or {}, _test_change(baseline["test"]) or {}
        key = f"in_domain_map{test_k}"
        out["baseline"] = dict(workdir=baseline["workdir"], test=baseline["test"],
                               change=theirs)
        if mine.get(key) is not None and theirs.get(key):
            out["in_domain_gain_vs_baseline"] = mine[key] / theirs[key]
    return out


def pareto_front(points: list) -> list:
    """The points (x, y) that no other point beats in both (>= in both, > in one), by x."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot(table: list, reference: Optional[dict], k: int, path: str,
         best: Optional[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = (reference or {}).get("pretrained", {}).get("val")
    if not base:
        return
    gain = lambda val: (100 * (val["out-of-domain"] - base["out-of-domain"]),  # noqa: E731
                        100 * (val["in-domain"] - base["in-domain"]))
    usable = [r for r in table if r["state"] == "complete" and r["val"]
              and "in-domain" in r["val"] and "out-of-domain" in r["val"]]
    if "in-domain" not in base or "out-of-domain" not in base:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    points = [gain(r["val"]) for r in usable]
    if points:
        ax.plot(*zip(*points), "o", color="tab:blue", alpha=0.6, label="trials")
        front = pareto_front(points)
        ax.plot(*zip(*front), "-", color="tab:blue", lw=1.2, label="Pareto front")
    if best is not None and best in usable:
        ax.plot(*gain(best["val"]), "*", ms=14, color="tab:red",
                label=f"selected (trial {best['number']})")
    ax.plot([0], [0], "ks", label="pretrained")
    baseline = (reference or {}).get("baseline")
    if baseline:
        curve = [(0.0, 0.0)] + [gain(p["val"]) for p in baseline["wise_ft"]]
        ax.plot(*zip(*curve), "--", color="tab:orange", label="baseline WiSE-FT")
        ax.plot(*gain(baseline["val"]), "D", color="tab:orange", label="baseline")
    ax.set_xlabel(f"out-of-domain val mAP@{k} change (points)")
    ax.set_ylabel(f"in-domain val mAP@{k} gain (points)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The test headlines table.md shows as changes from the pretrained model.
TABLE_TEST = ("text_to_image_r1", "generic_r1")


def markdown(table: list, reference: Optional[dict], space, k: int,
             best: Optional[dict]) -> str:
    """table.md: a row per trial (its space values by their names; val in-domain,
    out-of-domain and all; test in-domain mAP@k (eval.k) change and its ratio to the
    baseline's,
    then TABLE_TEST's changes), the pretrained model and the baseline first."""
    names = {entry.fields[0]: name for name, entry in space.items()}
    key = f"in_domain_map{k}"
    cols = ["trial", "state", *names.values(), "val in", "val out", "val all",
            f"test in mAP@{k} change", "x baseline", *(f"test {t}" for t in TABLE_TEST)]
    baseline = (reference or {}).get("baseline") or {}
    base_gain = (_test_change(baseline.get("test")) or {}).get(key)

    def number(x, signed=False):
        if x is None:
            return ""
        if isinstance(x, int):
            return str(x)
        return f"{x:+.3f}" if signed else f"{x:.3g}" if abs(x) >= 1e3 or abs(x) < 1e-2 \
            else f"{x:.3f}"

    def line(label, state, params, val, test):
        change = _test_change(test) or {}
        ratio = (change[key] / base_gain if change.get(key) is not None and base_gain
                 else None)
        val = val or {}
        return [label, state, *(number(params.get(f)) for f in names),
                *(number(val.get(v)) for v in ("in-domain", "out-of-domain", "all")),
                number(change.get(key), True), "" if ratio is None else f"{ratio:.2f}",
                *(number(change.get(t), True) for t in TABLE_TEST)]

    lines = []
    pretrained = (reference or {}).get("pretrained")
    if pretrained:
        lines.append(line("pretrained", "", {}, pretrained.get("val"), None))
    if baseline:
        lines.append(line("baseline", "", {}, baseline.get("val"), baseline.get("test")))
    for r in table:
        label = f"**{r['number']}**" if best is not None and r is best else str(r["number"])
        lines.append(line(label, r["state"], r["params"], r["val"], r["test"]))
    rows_ = [cols, ["---"] * len(cols), *lines]
    return "".join("| " + " | ".join(row) + " |\n" for row in rows_)


def progress(row: dict, done: int, budget: int, best: Optional[dict]) -> str:
    """One line for a finished trial."""
    what = {"complete": ", ".join(f"{k} {v:.4f}" for k, v in (row["values"] or {}).items()),
            "pruned": f"pruned at step {row['step']}",
            "fail": f"failed: {row['error'] or 'see the log'}"}.get(row["state"], row["state"])
    lead = f"; best so far: trial {best['number']}" if best else ""
    return (f"sweep: trial {row['number']} {row['state']} ({what}) in "
            f"{row['seconds'] or 0:.0f} s, {done}/{budget} done{lead}")


def write(study, sweep, run_cfg, workdir: str, finished=None) -> None:
    """Rewrite trials.jsonl, best.json and pareto.png; print `finished`'s progress line."""
    trials = study.get_trials(deepcopy=False)
    table = rows(trials, sweep.objectives)
    _write_text(os.path.join(workdir, "trials.jsonl"),
                "".join(json.dumps(r, sort_keys=True) + "\n" for r in table))
    best = choose(table, sweep.objectives)
    reference = reference_lib.load(workdir)
    k = run_cfg.train.eval_k
    if best is not None:
        run_checkpoints.write_json(os.path.join(workdir, "best.json"),
                                   best_report(best, reference, k, run_cfg.eval.k))
    plot(table, reference, k, os.path.join(workdir, "pareto.png"), best)
    _write_text(os.path.join(workdir, "table.md"),
                markdown(table, reference, sweep.space, run_cfg.eval.k, best))
    if finished is not None and not finished.user_attrs.get("skipped"):
        row = next(r for r in table if r["number"] == finished.number)
        done = len(study_lib.census(trials).done)
        print(progress(row, done, sweep.num_trials, best), file=sys.stderr, flush=True)


def _write_text(path: str, text: str) -> None:
    """Atomically, through a temporary file of this writer's own (workers write together)."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
