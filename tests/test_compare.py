"""compare's reading of sweep folders."""
import json

from infusing_jax import compare


def _sweep(root, name, baseline_config):
    sweep = root / name
    baseline = root / f"{name}_baseline"
    for d in (sweep, baseline):
        d.mkdir()
    (baseline / "config.json").write_text(json.dumps(baseline_config))
    (sweep / "best.json").write_text(json.dumps(
        {"trial": 3, "workdir": str(sweep / "trials" / "3"),
         "baseline": {"workdir": str(baseline)}}))
    return str(sweep)


def test_method_sweeps_that_share_their_baseline_list_it_once(tmp_path):
    naive = _sweep(tmp_path, "naive", {"train": {"num_steps": 400}})
    spd = _sweep(tmp_path, "spd", {"train": {"num_steps": 400}})
    longer = _sweep(tmp_path, "longer", {"train": {"num_steps": 800}})
    runs, names, trials = compare.expand_sweeps([naive, spd, longer])
    assert names == ["naive/baseline", "naive/trial 3", "spd/trial 3", "longer/baseline",
                     "longer/trial 3"]
    assert runs[0] == str(tmp_path / "naive_baseline")
    assert runs[3] == str(tmp_path / "longer_baseline")
    assert sorted(trials) == ["longer/trial 3", "naive/trial 3", "spd/trial 3"]
