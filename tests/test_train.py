"""The training pipeline: all four objectives, checkpoint/resume, reproducibility, DDP with gathered ITC."""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xvlm import Grounder
from xvlm.losses import bbox_loss, contrastive_loss, mask_tokens, sample_hard_negatives
from xvlm.models import XVLM
from xvlm.training.collate import collate
from xvlm.training.loop import make_optimizer, set_trainable, train
from xvlm.training.recipes import RECIPES, model_config, scaled, second_cycle

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
    fusion_only = [row for row in log if row["stage"] == "grounding-fusion"]
    assert fusion_only and {"itm_image", "l1", "attn"} <= set(fusion_only[0])
    assert all(torch.isfinite(torch.tensor(v)) for row in log for k, v in row.items() if k in ("itc", "l1", "mlm"))
    g = Grounder.from_pretrained(tmp_path / "run" / "final", device="cpu")
    r = g.ground(torch.zeros(50, 80, 3, dtype=torch.uint8).numpy(), "the red circle")
    assert 0 <= r.box_xyxy[0] <= r.box_xyxy[2] <= 80 and r.itm is not None and r.patch_heatmap.shape == (4, 4)


def test_grid16_recipe_runs_every_stage_and_gives_a_16x16_heatmap(tmp_path):
    """The GPU variant of the default recipe: one step of each stage on two images, and the model it exports."""
    recipe = dataclasses.replace(scaled(RECIPES["shapes-grid16"], 1e-6), batch_images=2)
    train(recipe, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in log] == [s.name for s in RECIPES["shapes"].stages]   # one logged step each
    g = Grounder.from_pretrained(tmp_path / "run" / "final", device="cpu")
    r = g.ground(torch.zeros(60, 90, 3, dtype=torch.uint8).numpy(), "the red circle")
    assert r.patch_heatmap.shape == (16, 16) and 0 <= r.box_xyxy[0] <= r.box_xyxy[2] <= 90


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


def test_align_probe_batch_is_the_same_in_every_process():
    """The batch that calibrates the cross-attention alignment is drawn alike under any PYTHONHASHSEED (it once came
    from `hash()` of a str, which made fresh runs differ from each other)."""
    script = textwrap.dedent("""
        import hashlib
        from xvlm.training.collate import align_probe_batch
        from xvlm.training.recipes import RECIPES, model_config
        from xvlm.training.sources import SyntheticSource
        from xvlm.preprocess import Tokenizer
        recipe = RECIPES["shapes-tiny"]
        tok = Tokenizer("weights/xvlm-shapes/vocab.txt", max_tokens=24, max_words=30)
        batch = align_probe_batch(SyntheticSource(recipe.seed), recipe, 1, 0, tok, model_config(recipe))
        print(hashlib.sha1(batch["input_ids"].numpy().tobytes() + batch["images"].numpy().tobytes()).hexdigest())
    """)
    digests = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append(proc.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 40


def test_batches_built_ahead_in_a_worker_are_the_batches_of_the_training_loop():
    """The loader worker changes when a batch is built, never what it holds: same tensors, same order, each step
    with its own stage's phrase kinds (the stream starts inside stage 1 and crosses into stage 2)."""
    from xvlm.preprocess import Tokenizer
    from xvlm.training.collate import StepBatches, step_batches
    from xvlm.training.sources import SyntheticSource
    recipe = RECIPES["shapes-tiny"]
    tok = Tokenizer(ROOT / "weights/xvlm-shapes/vocab.txt", max_tokens=24, max_words=30)
    dataset = StepBatches(SyntheticSource(recipe.seed), recipe, 0, tok, model_config(recipe))
    start = recipe.stages[0].steps - 1
    inline = list(step_batches(dataset, start, workers=0))
    ahead = list(step_batches(dataset, start, workers=1))
    assert len(inline) == len(ahead) == len(dataset) - start
    for a, b in zip(inline, ahead):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(inline[0]["input_ids"], inline[1]["input_ids"])


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    full = tmp_path / "full"
    _run_tiny(full)
    part = tmp_path / "part"
    _run_tiny(part, max_minutes=0.0)          # stops (with a checkpoint) after the first step
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 1
    _run_tiny(part)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _checkpoints_of_a_tiny_run(out: Path, monkeypatch) -> dict[int, Path]:
    """A shapes-tiny run with checkpoint.pt written after every step, each copy kept: {step: path}."""
    from xvlm.training import loop
    saved, save = {}, loop.save_training_state

    def save_and_keep(path, model, optimizer, step):
        save(path, model, optimizer, step)
        saved[step] = path.parent / f"checkpoint-{step}.pt"
        shutil.copy(path, saved[step])
    monkeypatch.setattr(loop, "save_training_state", save_and_keep)
    _run_tiny(out, ckpt_every=1)
    monkeypatch.undo()
    return saved


def test_a_run_resumed_at_any_step_equals_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    """Inside a stage (its optimizer state restored), right after the cross-attention alignment, at a stage's end:
    the batches, the per-step seeds and the arithmetic of the steps after a restart are the uninterrupted run's."""
    saved = _checkpoints_of_a_tiny_run(tmp_path / "full", monkeypatch)
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    full_log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert sorted(saved) == list(range(1, 8))
    for step in (2, 4, 5):          # stage 1 of 3 steps; stage 2 (aligned at step 3) of 2
        part = tmp_path / f"from-{step}"
        part.mkdir()
        shutil.copy(saved[step], part / "checkpoint.pt")
        _run_tiny(part)
        resumed = load_file(part / "final" / "model.safetensors")
        assert all(torch.equal(full[k], resumed[k]) for k in full), step
        log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
        assert [row["step"] for row in log] == list(range(step + 1, 8))
        assert [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log] == [
            {k: v for k, v in row.items() if k != "elapsed_s"} for row in full_log[step:]]


def test_checkpoints_keep_the_layout_that_runs_in_progress_wrote(tmp_path, monkeypatch):
    """checkpoint.pt as the training code before the xvlm.training split wrote it (the fixture: names and shapes of
    the model state, AdamW's groups and per-parameter state, the step): a run started then resumes now."""
    fixture = json.loads((ROOT / "tests/fixtures/training-checkpoint-layout.json").read_text())
    saved = _checkpoints_of_a_tiny_run(tmp_path, monkeypatch)
    for old in fixture["checkpoints"]:
        ckpt = torch.load(saved[old["step"]], weights_only=True)
        assert sorted(ckpt) == old["keys"] and ckpt["step"] == old["step"]
        assert {k: list(v.shape) for k, v in ckpt["model"].items()} == fixture["model"]
        groups = ckpt["optimizer"]["param_groups"]
        assert [{"weight_decay": g["weight_decay"], "lr": g["lr"], "params": g["params"]} for g in groups] == \
            old["param_groups"]
        state = ckpt["optimizer"]["state"]
        assert [[sorted(s), list(s["exp_avg"].shape)] for _, s in sorted(state.items())] == old["state"]


def test_starting_at_a_stage_from_exported_weights_equals_the_full_run(tmp_path):
    """How the shipped model's last stage was run: stages 1-2 exported, then --init/--start-stage for stage 3."""
    import dataclasses
    recipe = RECIPES["shapes-tiny"]
    full = tmp_path / "full"
    train(recipe, full, progress=False)
    first_two = dataclasses.replace(recipe, stages=recipe.stages[:2])
    train(first_two, tmp_path / "two", progress=False)
    last = recipe.stages[2]
    assert last.trainable == "fusion"
    train(recipe, tmp_path / "three", progress=False, init=tmp_path / "two" / "final", start_stage=last.name,
          vocab=str(tmp_path / "two" / "final" / "vocab.txt"))
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(tmp_path / "three" / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # every stage's end is kept as a model folder: the full run's stage-2 end is what the two-stage run exported
    mid = load_file(full / "stages" / recipe.stages[1].name / "model.safetensors")
    two_final = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert max((mid[k] - two_final[k]).abs().max().item() for k in mid) < 1e-6
    assert (full / "stages" / recipe.stages[1].name / "vocab.txt").is_file()
    assert sorted(p.name for p in (full / "stages").iterdir()) == sorted(s.name for s in recipe.stages)
    # the frozen scope left the encoders and ITC projections exactly as stage 2 exported them
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in two:
        moved = not torch.equal(two[k], b[k])
        trainable = k.startswith(("bbox_head.", "itm_head.")) or any(
            k.startswith(f"text_encoder.encoder.layer.{i}.") for i in range(2, 4))
        assert moved <= trainable, k
    assert any(not torch.equal(two[k], b[k]) for k in two if k.startswith("bbox_head."))


def test_a_second_cycle_continues_the_trained_fusion_instead_of_re_aligning_it(tmp_path):
    """How the shipped model was trained: the recipe's stages 2-3 again from its own export (`shapes-cycle2`)."""
    recipe = RECIPES["shapes-tiny"]
    train(recipe, tmp_path / "one", progress=False)
    # a trained fusion self-attention output (the tiny run's 2 steps leave it near the zero the alignment set)
    start = tmp_path / "start"
    shutil.copytree(tmp_path / "one" / "final", start)
    weights = load_file(start / "model.safetensors")
    key = "text_encoder.encoder.layer.2.attention.output.dense.weight"   # the first fusion layer
    weights[key] = torch.randn_like(weights[key]) * 0.1
    save_file(weights, start / "model.safetensors")
    for cycle, realigned in ((second_cycle(recipe), False), (dataclasses.replace(recipe, seed=1), True)):
        out = tmp_path / ("realigned" if realigned else "again")
        train(cycle, out, progress=False, init=start, start_stage=recipe.stages[1].name, vocab=str(start / "vocab.txt"))
        mid = load_file(out / "stages" / recipe.stages[1].name / "model.safetensors")
        change = ((mid[key] - weights[key]).norm() / weights[key].norm()).item()
        assert (change > 0.5) == realigned, (realigned, change)


@pytest.mark.parametrize("name, losses", [("shapes-verdict", {"itm_image", "itm", "l1", "attn"}),
                                          ("shapes-retrieval", {"itm_image", "itm_caption", "itm", "l1", "attn"})])
def test_the_last_stages_of_the_shipped_model_run_from_its_weights_and_leave_its_encoders(tmp_path, name, losses):
    """How the shipped model's last stages were trained (`shapes-verdict`, then `shapes-retrieval`, each from the
    previous export): one stage each, whole-image ITM with each image's absent texts (and, for retrieval, caption ITM),
    training only the fusion layers and the heads."""
    recipe = dataclasses.replace(RECIPES[name], batch_images=3)
    recipe = dataclasses.replace(recipe, stages=[dataclasses.replace(recipe.stages[0], steps=2)])
    stage = recipe.stages[0]
    assert stage.absent_per_image > 0 and stage.loss_weights.get("itm_image") and stage.trainable == "fusion"
    shipped = ROOT / "weights" / "xvlm-shapes"
    train(recipe, tmp_path / "run", progress=False, init=shipped, start_stage=stage.name,
          vocab=str(shipped / "vocab.txt"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(losses <= set(row) for row in log)
    before = load_file(shipped / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    fusion = tuple(f"text_encoder.encoder.layer.{i}." for i in range(2, 4))
    for k in before:
        moved = not torch.equal(before[k], after[k])
        assert moved <= k.startswith(("bbox_head.", "itm_head.") + fusion), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("itm_head."))


def test_init_from_a_model_of_another_grid_resamples_its_position_table(tmp_path):
    """`--init` a finer-grid recipe from a coarser model (`shapes-varied-grid16-cycle` from the shipped 12x12
    weights): the ViT position table is resampled bicubically to the new grid (timm's `resample_abs_pos_embed`, how
    ViTs are fine-tuned at a higher resolution), every other weight is taken as it is, and a real mismatch still
    fails with the strict loader's error."""
    from timm.layers import resample_abs_pos_embed

    from xvlm.checkpoint import CheckpointError, load_state_strict, save_pretrained, state_for_grid
    from xvlm.registry import create_model, get_model_config

    small_cfg = get_model_config("shapes-tiny")
    big_cfg = dataclasses.replace(small_cfg, vision=dataclasses.replace(
        small_cfg.vision, image_res=small_cfg.vision.image_res * 2))
    torch.manual_seed(0)
    small, big = create_model(small_cfg), create_model(big_cfg)
    key = "vision_encoder.backbone.pos_embed"
    g0, g1 = small_cfg.vision.grid_size, big_cfg.vision.grid_size
    assert g1 == 2 * g0
    state = state_for_grid(small, big)
    load_state_strict(big, state, "small")
    assert torch.equal(big.state_dict()[key], resample_abs_pos_embed(small.state_dict()[key], [g1, g1],
                                                                     [g0, g0], num_prefix_tokens=0))
    assert all(torch.equal(v, big.state_dict()[k]) for k, v in small.state_dict().items() if k != key)
    # a model of the same grid comes back as it is; another width is still refused, naming the tensors
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in state_for_grid(small, small).items())
    wide = create_model(dataclasses.replace(big_cfg, embed_dim=big_cfg.embed_dim * 2))
    with pytest.raises(CheckpointError, match="vision_proj"):
        load_state_strict(wide, state_for_grid(small, wide), "small")
    # and through the training loop: a run on the finer grid starts from the coarser export
    save_pretrained(small, tmp_path / "small")
    (tmp_path / "small" / "vocab.txt").write_text("")
    from xvlm.training.loop import _restore
    from xvlm.training.recipes import RECIPES as R
    recipe = dataclasses.replace(R["shapes-tiny"], model=big_cfg)
    start, st = _restore(big, tmp_path / "none.pt", recipe, True, tmp_path / "small", "grounding", rank=0)
    assert start == recipe.stages[0].steps and st is None
    assert torch.equal(big.state_dict()[key], state[key])


def test_text_layers_without_padding_give_the_padded_batchs_losses_and_gradients(monkeypatch):
    """Training runs the text and fusion layers on captions and phrases apart, each padded to its own longest text;
    every loss and gradient must be what one padded batch gives."""
    from xvlm import losses
    from xvlm.models import XVLM
    from xvlm.preprocess import Tokenizer
    from xvlm.training.objective import Pretrainer
    from xvlm.training.sources import SyntheticSource
    recipe = RECIPES["shapes-tiny"]
    stage = dataclasses.replace(recipe.stages[2], loss_weights={"itc": 1, "itm": 1, "mlm": 1, "bbox": 1, "attn": 1,
                                                                "itm_image": 1})
    tok = Tokenizer(ROOT / "weights/xvlm-shapes/vocab.txt", max_tokens=24, max_words=30)
    base = model_config(recipe)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=tok.vocab_size))
    torch.manual_seed(0)
    model = XVLM(cfg)
    objective = Pretrainer(model, tok, 0.25)
    objective.weights = stage.loss_weights
    batch = collate(SyntheticSource(0).batch(5, 0, 4), tok, cfg, stage, random.Random(0))
    lengths = batch["attention_mask"].sum(dim=1)
    captions, phrases = batch["is_image"].nonzero().squeeze(1), (~batch["is_image"]).nonzero().squeeze(1)
    assert lengths[phrases].max() < lengths[captions].max() <= batch["input_ids"].shape[1]
    # ITM negatives that cross the groups: each phrase's negative text a caption, each caption's a phrase
    neg_text = torch.empty_like(batch["group"])
    neg_text[phrases] = captions[torch.arange(len(phrases)) % len(captions)]
    neg_text[captions] = phrases[torch.arange(len(captions)) % len(phrases)]
    monkeypatch.setattr(losses, "sample_hard_negatives", lambda *args: (torch.roll(neg_text, 1), neg_text))

    def run():
        torch.manual_seed(1)          # the same MLM masks and image negatives both times
        model.zero_grad()
        out = objective(batch)
        objective.total(out).backward()
        return {k: v.item() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}
    trimmed, trimmed_grads = run()
    monkeypatch.setattr(losses, "without_padding", lambda tokens, mask: (tokens, mask))
    monkeypatch.setattr(losses, "in_length_groups",    # one group: the whole padded batch
                        lambda groups, run, tokens, mask, out_len=None: run(torch.arange(len(tokens)), tokens, mask))
    padded, padded_grads = run()
    assert trimmed.keys() == padded.keys() >= {"itc", "itm", "mlm", "l1", "giou", "attn", "itm_image"}
    for k in trimmed:
        assert abs(trimmed[k] - padded[k]) < 1e-5, k
    assert trimmed_grads.keys() == padded_grads.keys()
    for n in trimmed_grads:
        torch.testing.assert_close(trimmed_grads[n], padded_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_optimizer_decays_weight_matrices_only_and_skips_frozen_parameters():
    recipe = RECIPES["shapes-tiny"]
    base = model_config(recipe)
    model = XVLM(dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=50)))
    params = dict(model.named_parameters())   # biases, norms, temp: <= 1-D; BERT's embeddings: by name
    names = {id(p): n for n, p in params.items()}
    for stage in recipe.stages:
        set_trainable(model, stage)
        decay, no_decay = (group["params"] for group in make_optimizer(model, 1e-3, 0.05).param_groups)
        decayed, undecayed = {names[id(p)] for p in decay}, {names[id(p)] for p in no_decay}
        assert decayed | undecayed == {n for n, p in params.items() if p.requires_grad}
        assert not decayed & undecayed
        assert all(params[n].ndim > 1 and "embeddings" not in n for n in decayed)
        assert all(params[n].ndim <= 1 or "embeddings" in n for n in undecayed)
        assert "bbox_head.0.weight" in decayed and "bbox_head.0.bias" in undecayed
        if stage.trainable == "all":   # the ViT position table is 3-D: decayed like a weight (documented)
            assert "vision_encoder.backbone.pos_embed" in decayed
            assert "text_encoder.embeddings.word_embeddings.weight" in undecayed
        else:
            assert not any(n.startswith(("vision_encoder.", "text_proj.", "vision_proj.")) for n in decayed | undecayed)


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
    print("rank", rank, "gathered loss", loss.item(), "single-process loss", full.item())
    dist.barrier()
    dist.destroy_process_group()   # without it gloo's threads can abort the process at exit ("terminate called ...")
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


def test_itm_never_draws_a_negative_that_the_text_truly_describes():
    # pair 1's visual is the most similar to text 0, but text 0 describes it: it must never be drawn for text 0
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    describes = torch.zeros(4, 4, dtype=torch.bool)
    describes[0, 1] = True
    g = torch.Generator().manual_seed(0)
    drawn_for_text0, drawn_for_visual1 = set(), set()
    for _ in range(200):
        neg_image, neg_text = sample_hard_negatives(feats, feats, 0.05, torch.arange(4), describes, generator=g)
        drawn_for_text0.add(int(neg_image[0]))
        drawn_for_visual1.add(int(neg_text[1]))
    assert 1 not in drawn_for_text0 and 0 not in drawn_for_visual1
    unmasked = {int(sample_hard_negatives(feats, feats, 0.05, torch.arange(4), generator=g)[0][0]) for _ in range(50)}
    assert 1 in unmasked                          # without the mask, the hard negative is exactly that pair


def test_collate_marks_texts_that_describe_another_images_object(tmp_path):
    from PIL import Image

    from xvlm.data import Sample
    from xvlm.data.synthetic import Desc, Phrase, RefSpec, SceneObject
    from xvlm.data import training_sample
    from xvlm.training.collate import text_id
    from xvlm.training.recipes import Stage
    from xvlm.training.sources import make_tokenizer
    red_circle = SceneObject("circle", "red", "small", (0, 0, 10, 10))
    blue_square = SceneObject("square", "blue", "large", (20, 20, 40, 40))
    a = Sample(Image.new("RGB", (64, 64)), None, [Phrase("red circle", (0, 0, 10, 10), "object", (0,))], [red_circle])
    b = Sample(Image.new("RGB", (64, 64)), None, [
        Phrase("the red circle", (0, 0, 10, 10), "attribute", (0,), RefSpec("attribute", Desc("red", "circle"))),
        Phrase("the blue square", (20, 20, 40, 40), "attribute", (1,), RefSpec("attribute", Desc("blue", "square"))),
        Phrase("a red circle and a blue square", (0, 0, 40, 40), "region", (0, 1))], [red_circle, blue_square])
    recipe = RECIPES["shapes-tiny"]
    stage = Stage("t", 1, 1e-3, {"itm": 1}, ("object", "region", "attribute"), phrases_per_image=4)
    cfg = model_config(recipe)
    batch = collate([training_sample(a), training_sample(b)], make_tokenizer(tmp_path, cfg, None), cfg, stage,
                    random.Random(0))
    row = {int(i): k for k, i in enumerate(batch["idx"])}
    red_a, red_b = row[text_id("red circle")], row[text_id("the red circle")]
    blue, region = row[text_id("the blue square")], row[text_id("a red circle and a blue square")]
    d = batch["describes"]
    assert d[red_a, red_b] and d[red_b, red_a]          # across images: the same kind of object
    assert d[red_a, red_a] and d[blue, blue]
    assert not d[red_a, blue] and not d[blue, red_b]     # a different object
    assert not d[:, region].any() and not d[region].any()   # regions are left to the text ids
    di = batch["describes_image"]                          # [pairs, images]: never an image-level ITM negative
    assert di[red_a].tolist() == [True, True]              # its own image; b holds a red circle too
    assert di[blue].tolist() == [False, True]              # a holds no blue square
    assert di[region].tolist() == [True, True]             # unknown meaning: never a negative


def test_box_targets_that_name_one_object(tmp_path):
    """An object label is a box target only when no other object of its scene shares its colour and shape; with the
    stage option on, the bbox and attention losses skip the others and equal the losses over the rest."""
    from PIL import Image

    from xvlm.data import Sample
    from xvlm.data.synthetic import Desc, Phrase, RefSpec, SceneObject
    from xvlm.losses import bbox_loss
    from xvlm.models import XVLM
    from xvlm.data import training_sample
    from xvlm.training.collate import text_id
    from xvlm.training.objective import Pretrainer
    from xvlm.training.recipes import Stage
    from xvlm.training.sources import make_tokenizer
    objects = [SceneObject("circle", "red", "small", (0, 0, 10, 10)),
               SceneObject("circle", "red", "large", (30, 0, 60, 30)),
               SceneObject("square", "blue", "large", (20, 34, 40, 60))]
    sample = Sample(Image.new("RGB", (64, 64)), "two red circles and a blue square", [
        Phrase("red circle", (0, 0, 10, 10), "object", (0,)),
        Phrase("blue square", (20, 34, 40, 60), "object", (2,)),
        Phrase("the large red circle", (30, 0, 60, 30), "size", (1,), RefSpec("size", Desc("red", "circle", "large")))],
        objects)
    recipe = RECIPES["shapes-tiny"]
    stage = Stage("t", 1, 1e-3, {"bbox": 1, "attn": 1}, ("object", "size"), phrases_per_image=4)
    tok = make_tokenizer(tmp_path, model_config(recipe), None)
    batch = collate([training_sample(sample)], tok, model_config(recipe), stage, random.Random(0))
    row = {int(i): k for k, i in enumerate(batch["idx"])}
    names_one = batch["names_one_object"]
    assert not names_one[row[text_id("red circle")]]                  # a second red circle in the scene
    assert names_one[row[text_id("blue square")]] and names_one[row[text_id("the large red circle")]]
    assert names_one[row[text_id("two red circles and a blue square")]]

    torch.manual_seed(0)
    base = model_config(recipe)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=tok.vocab_size))
    objective = Pretrainer(XVLM(cfg).eval(), tok, 0.0)
    objective.weights = {"bbox": 1, "attn": 1}
    every = objective(batch)
    objective.unique_box_targets = True
    unique = objective(batch)
    phrases = ~batch["is_image"]
    keep = batch["names_one_object"][phrases]
    with torch.no_grad():
        fused = objective.model.fuse(objective.model.encode_text(batch["input_ids"], batch["attention_mask"])[phrases],
                                     batch["attention_mask"][phrases],
                                     objective.model.encode_image(batch["images"])[batch["group"][phrases]])
        pred = objective.model.predict_bbox(fused)
    l1_rest, giou_rest = bbox_loss(pred[keep], batch["boxes"][phrases][keep])
    torch.testing.assert_close(unique["l1"], l1_rest, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unique["giou"], giou_rest, atol=1e-5, rtol=1e-4)
    assert not torch.isclose(every["l1"], unique["l1"])


def test_image_matching_negatives_are_images_holding_nothing_the_phrase_describes():
    from types import SimpleNamespace

    from xvlm.losses import image_matching_loss
    drawn = []

    def fuse(text, mask, visual, last_rows=None):
        drawn.append(visual.index.tolist())
        return torch.zeros(len(text), 1, 4)

    model = SimpleNamespace(fuse=fuse, itm_logits=lambda fused: fused[:, 0, :2] + torch.tensor([0.0, 1.0]))
    tokens = torch.randn(3, 5, 4)
    describes_image = torch.tensor([[True, False, True],      # phrase 0: only image 1 is a negative
                                    [True, True, True],       # phrase 1: no negative anywhere
                                    [False, True, False]])    # phrase 2: images 0 or 2
    feats = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    for _ in range(20):
        loss = image_matching_loss(model, torch.zeros(3, 1, 4), tokens, torch.zeros(3, 2, 4), torch.ones(3, 2),
                                   feats, feats, 0.1, describes_image)
        assert torch.isfinite(loss)
    assert all(len(groups) == 2 and groups[0] == 1 and groups[1] in (0, 2) for groups in drawn)


def test_absent_texts_name_nothing_the_image_holds_and_take_each_kind_in_turn(tmp_path):
    """A stage with `absent_per_image` adds texts naming what each synthetic image lacks, tokenised apart from the
    pairs (no other loss sees them); a stage without it, and user data without objects, add none."""
    import numpy as np

    from xvlm.data import Sample, training_sample
    from xvlm.data.official import scene_to_sample
    from xvlm.data.synthetic import SHAPES, generate_scene
    from xvlm.training.recipes import Stage
    from xvlm.training.sources import make_tokenizer
    cfg = model_config(RECIPES["shapes-tiny"])
    tok = make_tokenizer(tmp_path, cfg, None)
    scenes = [generate_scene(np.random.default_rng([7, i])) for i in range(12)]
    stage = Stage("t", 1, 1e-3, {"itm_image": 1}, ("object",), phrases_per_image=2, absent_per_image=3)
    batch = collate([training_sample(scene_to_sample(s)) for s in scenes], tok, cfg, stage, random.Random(0))
    texts = [tok.wordpiece.decode(ids, skip_special_tokens=True) for ids in batch["absent_ids"]]
    group = batch["absent_group"].tolist()
    assert len(texts) == 3 * len(scenes) and sorted(set(group)) == list(range(len(scenes)))
    for text, i in zip(texts, group):
        words = text.split()
        objects = scenes[i].objects
        if words[-2] in ("the", "a"):                                      # a shape alone
            assert all(o.shape != words[-1] for o in objects), text
        else:
            assert all((o.color, o.shape) != (words[-2], words[-1]) for o in objects), text
    lacks_a_shape = [i for i, s in enumerate(scenes) if {o.shape for o in s.objects} != set(SHAPES)]
    assert lacks_a_shape
    for i in lacks_a_shape:                         # the few missing shapes are not drowned by many colour pairs
        assert any(texts[j].split()[-2] in ("the", "a") for j in range(len(texts)) if group[j] == i)

    plain = collate([training_sample(scene_to_sample(s)) for s in scenes], tok, cfg,
                    dataclasses.replace(stage, absent_per_image=0), random.Random(0))
    assert not any(k.startswith("absent") for k in plain)
    assert torch.equal(plain["input_ids"], batch["input_ids"])        # the pairs themselves are unchanged
    with pytest.raises(ValueError, match="absent_per_image needs the itm_image loss"):
        Stage("t", 1, 1e-3, {"itm": 1}, ("object",), absent_per_image=3)
    user = Sample(scenes[0].image, "a caption", [], [])
    assert not any(k.startswith("absent") for k in collate([training_sample(user)], tok, cfg, stage,
                                                           random.Random(0)))


def test_image_matching_loss_takes_absent_texts_as_negatives_of_their_own_image():
    from types import SimpleNamespace

    from xvlm.losses import image_matching_loss
    seen = []

    def fuse(text, mask, visual, last_rows=None):
        seen.append(visual.index.tolist())
        return text[:, :1]

    # the match logit is the text's first feature: positives score 2, absent texts 3 (a confident false match)
    model = SimpleNamespace(fuse=fuse, itm_logits=lambda fused: torch.cat([torch.zeros(len(fused), 1),
                                                                           fused[:, 0, :1]], dim=1))
    tokens = torch.randn(2, 5, 4)
    own = torch.full((2, 1, 4), 2.0)
    no_other_image = torch.ones(2, 2, dtype=torch.bool)            # every phrase could be in both images
    feats = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    absent = (torch.full((3, 2, 4), 3.0), torch.ones(3, 2), torch.tensor([1, 0, 1]))
    loss = image_matching_loss(model, own, tokens, torch.zeros(2, 2, 4), torch.ones(2, 2), feats, feats, 0.1,
                               no_other_image, absent)
    assert seen == [[1, 0, 1]]                                      # fused with their own images
    expected = (2 * torch.nn.functional.softplus(torch.tensor(-2.0)) + 3 * torch.nn.functional.softplus(
        torch.tensor(3.0))) / 5                                     # label 1 for the phrases, 0 for the absent texts
    torch.testing.assert_close(loss, expected)
    without = image_matching_loss(model, own, tokens, torch.zeros(2, 2, 4), torch.ones(2, 2), feats, feats, 0.1,
                                  no_other_image)
    torch.testing.assert_close(without, torch.nn.functional.softplus(torch.tensor(-2.0)))


def test_caption_itm_draws_its_negatives_among_the_captions_only(tmp_path, monkeypatch):
    """`itm_caption`: ITM of each caption with its whole image, negatives drawn among the batch's captions (the pairs
    retrieval's ITM re-rank compares); the phrases take no part, and a batch with one caption has nothing to learn."""
    from xvlm import losses
    from xvlm.training.objective import Pretrainer
    from xvlm.training.recipes import Stage
    from xvlm.training.sources import SyntheticSource, make_tokenizer
    cfg = model_config(RECIPES["shapes-tiny"])
    tok = make_tokenizer(tmp_path, cfg, None)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size))
    stage = Stage("t", 1, 1e-3, {"itm_caption": 1}, ("object",), phrases_per_image=3)
    batch = collate(SyntheticSource(0).batch(0, 0, 4), tok, cfg, stage, random.Random(0))
    captions = int(batch["is_image"].sum())
    assert captions == 4 and len(batch["is_image"]) > captions
    drawn = []
    real = losses.sample_hard_negatives

    def spy(image_feat, text_feat, temp, idx, *args, **kw):
        drawn.append((len(image_feat), len(text_feat)))
        return real(image_feat, text_feat, temp, idx, *args, **kw)

    monkeypatch.setattr(losses, "sample_hard_negatives", spy)
    torch.manual_seed(0)
    objective = Pretrainer(XVLM(cfg), tok, 0.0)
    objective.weights = dict(stage.loss_weights)
    out = objective(batch)
    assert set(out) == {"itm_caption"} and drawn == [(captions, captions)] and torch.isfinite(out["itm_caption"])
    out["itm_caption"].backward()
    assert objective.model.itm_head[0].weight.grad.abs().sum() > 0
    one = collate(SyntheticSource(0).batch(0, 0, 1), tok, cfg, stage, random.Random(0))
    assert objective(one) == {}


def test_per_image_cross_attention_equals_attention_over_each_texts_own_tokens():
    """Training's cross-attention keeps one copy of each image's keys/values; texts of several images with their own
    [CLS] and patch masks must get what attention over [cls_p, patches of image p] gives — outputs, gradients and
    the attention map that the guidance loss reads."""
    import torch.nn.functional as F

    from xvlm.config import TextConfig
    from xvlm.models.bert import BertSelfAttention, ImageContext, additive_mask
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=10, hidden_size=48, num_hidden_layers=2, fusion_layer=1, num_attention_heads=3,
                     intermediate_size=64, max_position_embeddings=16)
    attn = BertSelfAttention(cfg, kv_width=40).eval()
    B, N, P, T = 4, 9, 11, 5
    patches, cls = torch.randn(B, N, 40, requires_grad=True), torch.randn(P, 40, requires_grad=True)
    hidden = torch.randn(P, T, 48, requires_grad=True)
    index = torch.tensor([3, 0, 0, 2, 3, 3, 1, 0, 3, 2, 0])        # unsorted, unequal texts per image
    keep = (torch.rand(P, 1 + N) > 0.4).float()
    keep[:, 0] = 1
    mask = additive_mask(keep, torch.float32)
    out, attention_map = attn(hidden, mask, ImageContext(cls, patches, index), need_weights=True)
    torch.testing.assert_close(attn(hidden, mask, ImageContext(cls, patches, index)), out, atol=0, rtol=0)
    tokens = torch.cat([cls[:, None], patches[index]], dim=1)
    q, k, v = attn._heads(attn.query(hidden)), attn._heads(attn.key(tokens)), attn._heads(attn.value(tokens))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    reference_map = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + mask).softmax(dim=-1)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_map, reference_map, atol=1e-6, rtol=1e-5)
    assert attention_map[..., 1:][(keep[:, None, None, 1:] == 0).expand_as(attention_map[..., 1:])].max() < 1e-6
    upstream = torch.randn_like(out)
    ours = torch.autograd.grad((out * upstream).sum(), [hidden, cls, patches])
    theirs = torch.autograd.grad((reference * upstream).sum(), [hidden, cls, patches])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_region_data_alone_is_refused_before_a_run_starts(tmp_path, capsys):
    """The grounding stages take no 'region' phrases: region-format data alone gives their box loss nothing (it used
    to crash in stage 2 with a bare max() error). The CLI says so, exit 2, before it creates the run folder."""
    import json

    from PIL import Image

    from xvlm.data import official
    from xvlm.training import cli
    from xvlm.training.recipes import RECIPES
    from xvlm.training.sources import ListSource

    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    rec = {"image": "a.png", "caption": "a red square", "elems": [{"caption": "red square", "bb": [4, 4, 20, 20]}]}
    (tmp_path / "reg.json").write_text(json.dumps([rec]))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["--recipe", "shapes-tiny", "--data", str(tmp_path / "reg.json"), "--data-format", "region",
                  "--image-root", str(tmp_path), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "grounding, grounding-fusion" in err and "--data-format grounding" in err
    assert not out.exists()
    source = ListSource(official.load_region_json(tmp_path / "reg.json", tmp_path), seed=0)
    assert [s.name for s in cli.phraseless_stages(RECIPES["shapes-tiny"], source)] == ["grounding", "grounding-fusion"]
    assert [s.name for s in cli.phraseless_stages(RECIPES["shapes-tiny"], source, start_stage="grounding-fusion")] == [
        "grounding-fusion"]
    grounding = {"image": "a.png", "text": "the red square", "bbox": [4, 4, 20, 20]}
    (tmp_path / "g.json").write_text(json.dumps([grounding]))
    g_source = ListSource(official.load_grounding_json(tmp_path / "g.json", tmp_path), seed=0)
    assert cli.phraseless_stages(RECIPES["shapes-tiny"], g_source) == []
