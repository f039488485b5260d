"""The training pipeline: all four objectives, checkpoint/resume, reproducibility, DDP with gathered ITC."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xvlm import Grounder
from xvlm.losses import bbox_loss, contrastive_loss, mask_tokens
from xvlm.train import RECIPES, train

ROOT = Path(__file__).resolve().parent.parent


def _run_tiny(out: Path, **kw):
    return train(RECIPES["shapes-tiny"], out, progress=False, **kw)


def test_tiny_recipe_trains_all_objectives_and_exports_a_loadable_model(tmp_path):
    _run_tiny(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    pretrain = [row for row in log if row["stage"] == "pretrain"]
    assert {"itc", "itm", "mlm", "l1", "giou"} <= set(pretrain[0])
    grounding = [row for row in log if row["stage"] == "grounding"]
    assert grounding and "mlm" not in grounding[0]           # weight 0 in the grounding stage = not computed
    assert all(torch.isfinite(torch.tensor(v)) for row in log for k, v in row.items() if k in ("itc", "l1", "mlm"))
    g = Grounder.from_pretrained(tmp_path / "run" / "final", device="cpu")
    r = g.ground(torch.zeros(50, 80, 3, dtype=torch.uint8).numpy(), "the red circle")
    assert 0 <= r.box_xyxy[0] <= r.box_xyxy[2] <= 80 and r.itm is not None and r.patch_heatmap.shape == (4, 4)


def test_training_is_reproducible_and_resumes(tmp_path):
    _run_tiny(tmp_path / "a")
    _run_tiny(tmp_path / "b")
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run resumes at its last step and does no more work
    steps_before = len((tmp_path / "a" / "log.jsonl").read_text().splitlines())
    _run_tiny(tmp_path / "a")
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == steps_before


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    full = tmp_path / "full"
    _run_tiny(full)
    part = tmp_path / "part"
    _run_tiny(part, max_minutes=0.0)          # stops (with a checkpoint) after the first step
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 1
    _run_tiny(part)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_contrastive_loss_treats_same_text_as_positive():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    logits = img @ txt.T / 0.1
    targets = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    expected = (-(logits.log_softmax(1) * targets).sum(1).mean() - (logits.T.log_softmax(1) * targets).sum(1).mean()) / 2
    assert torch.allclose(contrastive_loss(img, txt, 0.1, torch.tensor([5, 5, 2, 3])), expected, atol=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    plain = (plain + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    assert torch.allclose(contrastive_loss(img, txt, 0.1, torch.tensor([0, 1, 2, 3])), plain, atol=1e-6)


def test_bbox_loss_is_zero_for_exact_boxes_and_grows_with_error():
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    l1, giou = bbox_loss(target.clone(), target)
    assert l1.item() == 0 and abs(giou.item()) < 1e-6
    l1_far, giou_far = bbox_loss(torch.tensor([[0.2, 0.2, 0.2, 0.2]]), target)
    assert l1_far > 0.5 and giou_far > 1.0        # disjoint boxes: GIoU loss above 1


def test_mask_tokens_masks_at_least_one_word_and_never_special_tokens():
    ids = torch.tensor([[2, 10, 11, 0], [2, 12, 0, 0]])
    attn = (ids != 0).long()
    masked, labels = mask_tokens(ids, attn, mask_id=4, vocab_size=20, prob=0.0, special_ids=(0, 2),
                                 generator=torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(dim=1) == 1).all()
    assert (labels[:, 0] == -100).all() and (labels[ids == 0] == -100).all()


DDP_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from xvlm.losses import contrastive_loss
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 1, 7])
    full = contrastive_loss(img, txt, 0.07, idx)          # no process group yet: one process' loss over all 8 pairs
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local = slice(4 * rank, 4 * rank + 4)
    mine = img[local].clone().requires_grad_()
    loss = contrastive_loss(mine, txt[local], 0.07, idx[local])
    loss.backward()
    assert torch.allclose(loss, full, atol=1e-6), (loss, full)
    assert mine.grad.abs().sum() > 0
    print("rank", rank, "gathered loss", float(loss), "single-process loss", float(full))
""")


def _torchrun(args, tmp_path, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + args
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_gathers_contrastive_features_across_processes(tmp_path):
    (tmp_path / "ddp_itc.py").write_text(DDP_SCRIPT)
    proc = _torchrun([str(tmp_path / "ddp_itc.py")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gathered loss") == 2


def test_two_process_cpu_training_run(tmp_path):
    proc = _torchrun(["-m", "xvlm", "train", "--recipe", "shapes-tiny", "--out", str(tmp_path / "ddp")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = json.loads((tmp_path / "ddp" / "recipe.json").read_text())
    assert recipe["world_size"] == 2
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
