"""bench/train_step.py runs end to end on a tiny model: its CPU figures, and its
bfloat16 accelerator mode (forced onto the CPU here) with TensorFlow unimportable;
bench/fsdp_memory.py runs alone as its own entry; bench/input_pipeline.py and bench/loop.py
run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "train_step.py")
FSDP_MEMORY = os.path.join(ROOT, "bench", "fsdp_memory.py")
TINY = ["--variant=mu/16", "--batch_size=2", "--accelerator_batch_size=4", "--num_classes=10",
        "--rounds=1", "--extra_rounds=0", "--steps_per_sample=2"]


def _env() -> dict:
    # PYTHONPATH: the scripts' own subprocesses import this checkout's infusing_jax too.
    return dict(os.environ, GLIBC_TUNABLES="", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def _last_json(cmd: list, env: dict) -> dict:
    """Runs cmd in ROOT; -> its last line's JSON."""
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(code: str, *args) -> dict:
    """Runs `code` (with sys.argv = [BENCH, *args]) in a fresh Python; -> its last line's JSON.

    Like `python bench/train_step.py`, `code` puts bench/ first on sys.path (the bench's
    modules import each other by name)."""
    return _last_json([sys.executable, "-c", textwrap.dedent(code), BENCH, *args], _env())


def test_accelerator_mode_runs_in_bfloat16_without_tensorflow():
    code = """
        import os, runpy, sys
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(sys.argv[0]))
        for name in ("tensorflow", "tensorflow_datasets"):
            sys.modules[name] = None  # any import of them now raises ImportError
        runpy.run_path(sys.argv[0], run_name="__main__")
    """
    out = _run(code, "--mode=accelerator", "--accelerator_matmul_n=256", "--peak_flops=1e12",
               *TINY)
    setup = out["setup"]
    assert (setup["mode"], setup["dtype"], setup["param_dtype"]) == (
        "accelerator", "bfloat16", "float32")
    assert setup["batch_size"] == 4 and setup["variant"] == "mu/16"
    assert set(out["images_per_s_by_step"]) == {
        "jax_plain", "jax_precomputed_target", "jax_precomputed_generic", "jax_online_target",
        "jax_online_generic"}
    assert out["images_per_s"] == pytest.approx(4 / out["seconds"]["jax_plain"], rel=2e-3)
    assert out["peak_source"] == "--peak_flops" and setup["devices"] == 1
    assert 0 < out["model_flops_utilization"] < 1
    assert out["model_flops_utilization"] == pytest.approx(
        out["step_flops_per_s"] / 1e12, rel=2e-3)
    assert out["online_teacher_overhead"] > 0 and out["precomputed_teacher_overhead"] > 0
    assert len(out["all_s"]["jax_plain"]) == 1


def test_device_peaks_match_the_most_specific_kind():
    code = """
        import json, os, sys
        sys.path.insert(0, os.path.dirname(sys.argv[1]))
        import accelerator_mode
        kinds = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA L40",
                 "NVIDIA L4", "TPU v5 lite", "TPU v5e", "TPU v5", "TPU v6e", "TPU v4", "cpu"]
        print(json.dumps({k: accelerator_mode.peak_bf16_flops(k) for k in kinds}))
    """
    assert _run(code) == {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
                          "NVIDIA H200": 989e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12,
                          "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
                          "TPU v6e": 918e12, "TPU v4": 275e12, "cpu": None}


def test_cpu_mode_reports_every_headline_figure():
    out = _last_json([sys.executable, BENCH, "--mode=cpu", "--fsdp_variant=mu/16",
                      "--fsdp_devices=2", *TINY], _env())
    for key in ("speedup_vs_pytorch", "fraction_of_matmul_peak", "online_teacher_overhead",
                "precomputed_teacher_overhead", "fsdp_memory_reduction"):
        assert out[key] > 0, key
    assert out["setup"]["mode"] == "cpu" and out["setup"]["steps_per_sample"] == 2
    # The bounds: PyTorch's step time over the step's FLOPs at XLA's / MKL's best matmul.
    med = out["median"]
    for bound, rate in (("speedup_bound_at_best_matmul", "best_matmul_flops_per_s"),
                        ("speedup_bound_at_torch_matmul", "torch_best_matmul_flops_per_s")):
        assert med[bound] == pytest.approx(
            med["seconds"]["torch_plain"] * med[rate] / out["step_flops_analytic"], rel=1e-2)
    sweep = med["matmul_sweep_flops_per_s"]
    assert "torch_4096x4096x4096" in sweep
    assert med["torch_best_matmul_flops_per_s"] == max(
        v for k, v in sweep.items() if k.startswith("torch_"))
    assert med["best_matmul_flops_per_s"] == max(
        med["matmul_4096_flops_per_s"], *(v for k, v in sweep.items() if "torch" not in k))
    assert out["fsdp"]["devices"] == 2 and out["fsdp_memory_reduction"] > 1
    # FLOPs: XLA's count of the tiny model = our analytic matmul count + its elementwise work.
    assert 1 < out["step_flops_xla"] / out["step_flops_analytic"] < 1.15


def test_fsdp_memory_runs_alone_on_host_devices_it_asks_for():
    env = _env()
    env.pop("XLA_FLAGS", None)  # the script sets the host device count itself
    out = _last_json([sys.executable, FSDP_MEMORY, "--variant=mu/16", "--devices=2",
                      "--batch_size=2", "--num_classes=10"], env)
    assert (out["variant"], out["devices"], out["scan"]) == ("mu/16", 2, True)
    one, two = out["1"], out["2"]
    # One device holds the whole train state and reference; FSDP on 2 about half of it.
    assert one["state_and_reference_bytes"] == one["global_state_and_reference_bytes"]
    assert two["global_state_and_reference_bytes"] == one["global_state_and_reference_bytes"]
    assert 1.5 < out["fsdp_memory_reduction"] <= 2
    assert out["fsdp_memory_reduction"] == pytest.approx(
        one["state_and_reference_bytes"] / two["state_and_reference_bytes"], abs=1e-3)
    assert two["temp_bytes"] > 0 and one["alias_bytes"] > 0  # the state is donated


def test_input_pipeline_bench_runs_beside_the_trainers_step():
    out = _last_json([sys.executable, os.path.join(ROOT, "bench", "input_pipeline.py"),
                      "--variant=mu/16", "--num_images=16", "--batch_size=2", "--steps=1"],
                     _env())
    assert out["pipeline_images_per_s"] > 0 and out["train_step_images_per_s"] > 0
    assert out["pipeline_vs_train_step"] == pytest.approx(
        out["pipeline_images_per_s"] / out["train_step_images_per_s"], abs=0.01)


def test_loop_bench_times_the_loop_and_its_own_step_on_a_toy_world(tmp_path):
    from infusing_jax.toy import world as toy_world
    world = str(tmp_path / "world")
    toy_world.make(world, seed=0, generic_train=96, generic_test=48, target_classes=(4, 2, 3),
                   target_per_class=(3, 2, 2))
    subprocess.run([sys.executable, "-m", "infusing_jax.toy.pretrain", "--verbosity=-1",
                    f"--workdir={world}/vlm", f"--config=configs/toy_pretrain.py:world={world},"
                    "steps=2"], env=_env(), cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    out = _last_json([sys.executable, os.path.join(ROOT, "bench", "loop.py"), f"--world={world}",
                      "--rounds=2", "--steps=12", "--verbosity=-1"], _env())
    assert len(out["rounds"]) == 2 and out["setup"]["steps"] == 12
    for r in out["rounds"]:
        assert r["loop_images_per_s"] > 0 and r["step_images_per_s"] > 0
        assert r["loop_vs_step"] == pytest.approx(
            r["loop_images_per_s"] / r["step_images_per_s"])
    ratios = sorted(r["loop_vs_step"] for r in out["rounds"])
    assert out["loop_vs_step"] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert out["spread"] == pytest.approx(ratios[1] - ratios[0])
