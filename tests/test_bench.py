"""bench/train_step.py runs end to end on a tiny model: its CPU figures, and its
bfloat16 accelerator mode (forced onto the CPU here) with TensorFlow unimportable."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "train_step.py")
TINY = ["--variant=mu/16", "--batch_size=2", "--accelerator_batch_size=4", "--num_classes=10",
        "--rounds=1", "--extra_rounds=0", "--steps_per_sample=2"]


def _run(code: str, *args) -> dict:
    """Runs `code` (with sys.argv = [BENCH, *args]) in a fresh Python; -> its last line's JSON."""
    env = dict(os.environ, GLIBC_TUNABLES="", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    argv = [BENCH, *args]
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_accelerator_mode_runs_in_bfloat16_without_tensorflow():
    code = """
        import runpy, sys
        sys.argv = sys.argv[1:]
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
        import json, runpy, sys
        bench = runpy.run_path(sys.argv[1], run_name="bench")
        kinds = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA L40",
                 "NVIDIA L4", "TPU v5 lite", "TPU v5e", "TPU v5", "TPU v6e", "TPU v4", "cpu"]
        print(json.dumps({k: bench["peak_bf16_flops"](k) for k in kinds}))
    """
    assert _run(code) == {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
                          "NVIDIA H200": 989e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12,
                          "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
                          "TPU v6e": 918e12, "TPU v4": 275e12, "cpu": None}


def test_cpu_mode_reports_every_headline_figure():
    code = """
        import runpy, sys
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """
    out = _run(code, "--mode=cpu", "--fsdp_variant=mu/16", "--fsdp_devices=2", *TINY)
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
