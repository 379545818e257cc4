"""`torchrun --nproc_per_node=2 -m DiffusionCore train throughplane ...` logs its setup once, from rank 0 (the warnings
about the user's data too), and no process warns "Grad strides do not match bucket view strides": the predictor's
(1, C, 1, 1) factor embedding, left with channels_last strides, gets the plain strides its gradient comes with
before DDP lays out its buckets (DiffusionCore.train.distributed.settle_ambiguous_strides)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ct_phantom_array

from DiffusionCore.sr.throughplane import ThroughPlaneConfig, ThroughPlaneNet
from DiffusionCore.train.distributed import settle_ambiguous_strides
from DiffusionCore.volume import Volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "DiffusionCore",
         "train", "throughplane", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_under_torchrun_setup_and_data_warnings_come_once_and_ddp_does_not_warn_of_strides(tmp_path):
    thick, thin = tmp_path / "thick.nii.gz", tmp_path / "thin.nii.gz"
    write_volume(Volume(ct_phantom_array((40, 64, 64), seed=8), spacing=(0.8, 0.8, 4.0)), thick)
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), thin)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"channels": 8, "blocks": 1, "factors": [2, 4]},
                               "pairs": {"thick_rows": 6, "width": 32}, "batch_size": 4, "val_every": 2,
                               "checkpoint_every": 2, "val_pairs": 4}))  # fmt: skip
    out = tmp_path / "run"
    r = _torchrun("--config", str(cfg), "--data", str(thick), "--out-dir", str(out), "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("info: found 1 CT volume(s)", "info: thick.nii.gz: train slices", "info: joined process group",
                 "warning: every training CT has slices thicker than 3 mm", "info: exported"):  # fmt: skip
        assert r.stderr.count(line) == 1, (line, r.stderr[-3000:])
    assert "Grad strides" not in r.stderr
    r = _torchrun(
        "--config", str(cfg), "--data", str(thin), "--out-dir", str(out), "--max-steps", "4", "--resume"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("info: resumed from", "warning: resuming with other training data than the run recorded"):
        assert r.stderr.count(line) == 1, (line, r.stderr[-3000:])
    assert "Grad strides" not in r.stderr and "slices thicker" not in r.stderr
    assert json.loads((out / "summary.json").read_text())["data"] == ["thick.nii.gz", "thin.nii.gz"]


def test_settled_strides_keep_the_output_and_match_the_gradients_ddp_buckets_expect():
    """The predictor's forward pass is bit for bit what it was; afterwards every parameter's gradient has the
    parameter's own strides (DDP's bucket views copy those), where the factor embedding's did not before."""
    torch.manual_seed(0)
    net = ThroughPlaneNet(ThroughPlaneConfig(channels=8, blocks=1, factors=[2, 4])).to(
        memory_format=torch.channels_last
    )
    for p in net.parameters():  # non-zero everywhere (a fresh net's heads are zero)
        p.data.add_(0.01 * torch.randn_like(p))
    thick = torch.randn(2, 1, 6, 32)

    def grads() -> tuple[torch.Tensor, dict[str, tuple[tuple, tuple]]]:
        net.zero_grad(set_to_none=True)
        out = net(thick, 2)
        out.square().mean().backward()
        return out.detach(), {
            n: (p.stride(), p.grad.stride()) for n, p in net.named_parameters() if p.grad is not None
        }

    before, strides = grads()
    assert strides["factor_embedding.2"] == ((8, 1, 8, 8), (8, 1, 1, 1))  # the mismatch DDP warned of
    assert settle_ambiguous_strides(net) == 2  # the two factor embeddings; no convolution weight
    after, strides = grads()
    assert torch.equal(before, after)
    assert {n: s for n, s in strides.items() if s[0] != s[1]} == {}
