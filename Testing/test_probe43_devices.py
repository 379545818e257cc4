"""Where a GPU user's run computes (probe 43, a GPU readiness review), checked on this CPU machine with torch.cuda's
answers faked: ``--device auto`` does not pick a GPU the installed PyTorch build has no kernels for (a GeForce 10xx
under a CUDA 12.8 build: "no kernel image is available", reported as an internal error), an explicit ``cuda`` on such a
GPU is refused with what to do, and ``cuda:N`` is refused under a launch of several processes (every process would
take GPU N)."""

from __future__ import annotations

import pytest
import torch

from DiffusionCore.devices import cuda_arch_problem, process_info, resolve_device
from DiffusionCore.errors import ConfigError, ResourceError


def _fake_gpu(monkeypatch, capability, arches, count=2):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA GeForce GTX 1080")


CU128_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize(("capability", "arches", "supported"), [
    ((6, 1), CU128_ARCHES, False),  # Pascal under a CUDA 12.8 build of torch 2.8+
    ((7, 0), CU128_ARCHES, False),  # Volta: from torch 2.11 on
    ((8, 9), CU128_ARCHES, True),  # Ada runs the sm_86 binary (same major, older minor)
    ((9, 0), CU128_ARCHES, True),
    ((13, 0), CU128_ARCHES, True),  # a newer GPU: the compute_120 PTX is compiled for it
    ((6, 1), ["sm_50", "sm_60", "sm_61", "sm_70"], True),
    ((6, 1), [], True),  # the build lists nothing: try the GPU, as before
    ((9, 0), ["sm_90a"], True),  # nothing this understands: try the GPU
])  # fmt: skip
def test_which_gpus_this_build_can_run(monkeypatch, capability, arches, supported):
    _fake_gpu(monkeypatch, capability, arches)
    assert (cuda_arch_problem(0) is None) == supported


def test_a_rocm_build_runs_on_its_amd_gpu(monkeypatch):
    _fake_gpu(monkeypatch, (9, 4), ["gfx90a", "gfx942", "gfx1100"])  # ROCm: torch.cuda drives AMD GPUs
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    assert cuda_arch_problem(0) is None
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda", 0)


def test_auto_computes_on_the_cpu_beside_a_gpu_the_build_cannot_run_and_says_why(monkeypatch, caplog):
    from DiffusionCore import devices

    monkeypatch.setattr(devices, "_SAID", set())
    _fake_gpu(monkeypatch, (6, 1), CU128_ARCHES)
    with caplog.at_level("WARNING", logger="DiffusionCore"):
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device("auto") == torch.device("cpu")  # a second run (the Python API): said once
    assert caplog.text.count("is not supported by this PyTorch build") == 1
    assert ("NVIDIA GeForce GTX 1080 (compute capability 6.1) is not supported by this PyTorch build" in caplog.text
            and "kernels for sm_75, sm_80" in caplog.text and "computing on the CPU instead" in caplog.text)  # fmt: skip
    _fake_gpu(monkeypatch, (8, 6), CU128_ARCHES)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_an_explicit_cuda_on_such_a_gpu_is_refused_with_what_to_do(monkeypatch):
    _fake_gpu(monkeypatch, (6, 1), CU128_ARCHES)
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(ResourceError, match=r"GTX 1080 \(compute capability 6\.1\) is not supported .*: use "
                                                r"--device cpu, or install a PyTorch build that supports this GPU"):  # fmt: skip
            resolve_device(asked)


def test_one_named_gpu_is_refused_under_a_launch_of_several_processes(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), CU128_ARCHES)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"'cuda:0' names one GPU, but this machine runs 2 processes of the "
                                          r"launch.*CUDA_VISIBLE_DEVICES"):  # fmt: skip
        process_info("cuda:0")
    assert process_info("cuda").device == torch.device("cuda", 1)  # each process its LOCAL_RANK's GPU
    assert process_info("auto").device == torch.device("cuda", 1)
    assert process_info("cuda:1").device == torch.device("cuda", 1)  # its own GPU, named: nothing to refuse
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines, one process each: cuda:0 is each one's only GPU
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_info("cuda:0").device == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert process_info("cuda:1").device == torch.device("cuda", 1)  # one process: any GPU it names


def test_a_gpu_out_of_memory_offers_the_cpu_and_a_gpu_failure_is_not_called_a_bug(capsys):
    from DiffusionCore.cli.common import run_guarded

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name, as run_guarded recognises it
        pass

    def gpu_full():
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")

    assert run_guarded(gpu_full, memory_hint="use a smaller --factor") == 5
    assert capsys.readouterr().err == ("error: out of memory on the GPU: use a smaller --factor, run on the CPU "
                                       "(--device cpu: slower, with the machine's memory), or use a GPU with more "
                                       "memory.\n")  # fmt: skip

    def host_full():
        raise MemoryError()

    assert run_guarded(host_full, memory_hint="use less") == 5
    assert capsys.readouterr().err == "error: out of memory: use less, or use a machine with more memory.\n"

    def no_kernel():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    assert run_guarded(no_kernel) == 5
    err = capsys.readouterr().err
    assert err.startswith("error: the GPU failed (CUDA error: no kernel image is available") and "internal" not in err
    assert "Run again on the CPU (--device cpu)" in err


def test_training_under_torchrun_refuses_one_named_gpu_too(monkeypatch):
    from DiffusionCore.train.distributed import init_distributed

    _fake_gpu(monkeypatch, (9, 0), CU128_ARCHES)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"'cuda:1' names one GPU, but this machine runs 2 processes"):
        init_distributed("cuda:1")  # refused before the GPU is selected or a process group is joined


def test_a_cuda_error_from_a_bug_is_still_reported_as_one(capsys):
    from DiffusionCore.cli.common import run_guarded

    for setup in ("CUDA error: CUDA driver version is insufficient for CUDA runtime version",
                  "CUDA error: no CUDA-capable device is detected"):  # fmt: skip
        assert run_guarded(lambda text=setup: (_ for _ in ()).throw(RuntimeError(text))) == 5
        assert capsys.readouterr().err.startswith("error: the GPU failed (")

    def bug():
        raise RuntimeError("CUDA error: device-side assert triggered")  # an index out of range in the code

    assert run_guarded(bug) == 1
    assert "internal error (RuntimeError: CUDA error: device-side assert triggered)" in capsys.readouterr().err


def test_a_gpu_result_records_what_changes_its_voxels_and_keeps_the_name_if_the_rest_cannot_be_read(monkeypatch):
    from DiffusionCore.provenance import environment

    _fake_gpu(monkeypatch, (8, 6), CU128_ARCHES)
    monkeypatch.setattr(torch.version, "cuda", "12.8", raising=False)
    record = environment("cuda:0")
    assert record["gpu"] == "NVIDIA GeForce GTX 1080" and record["gpu_capability"] == "8.6"
    assert record["cuda"] == "12.8" and record["tf32_convolutions"] in ("true", "false")

    def fails(index=None):
        raise RuntimeError("the driver did not answer")

    monkeypatch.setattr(torch.cuda, "get_device_capability", fails)
    record = environment("cuda:0")
    assert record["gpu"] == "NVIDIA GeForce GTX 1080" and "gpu_capability" not in record
    assert "gpu" not in environment("cpu")
