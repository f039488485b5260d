"""The training loop: a run folder, DDP, per-stage optimizers, checkpoints, resume, --max-minutes and the export.

A run folder holds recipe.json, vocab.txt, log.jsonl (one JSON line per step), checkpoint.pt ({"model": state dict,
"optimizer": the stage's AdamW state, "step": steps done}), stages/NAME/ (the model at each stage's end) and final/.
Step s draws its batch and seeds torch from (seed, rank, s) alone, so a run resumed from its checkpoint continues
exactly as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..checkpoint import save_pretrained
from ..config import XVLMConfig
from ..models import XVLM
from ..preprocess import Tokenizer
from .collate import StepBatches, align_probe_batch, step_batches
from .objective import Pretrainer, align_cross_attention
from .recipes import Recipe, Stage, model_config
from .sources import SyntheticSource, make_tokenizer


# --- per-stage optimisation ---------------------------------------------------------------------------------------
def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up, then a cosine to 0 over the stage's steps (`step` counts from the stage's start)."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_trainable(model: XVLM, stage: Stage) -> None:
    """Which parameters the stage trains, and train/eval mode to match.

    "fusion" trains the fusion layers and the ITM/bbox heads; the vision encoder, the text layers and the ITC
    projections keep their weights (and run in eval mode), so ITC scores and heatmaps do not move.
    """
    if stage.trainable not in ("all", "fusion"):
        raise ValueError(f"unknown trainable scope {stage.trainable!r}")
    model.train()
    if stage.trainable == "all":
        model.requires_grad_(True)
        return
    fusion = {id(p) for layer in model.text_encoder.fusion_layers for p in layer.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in fusion or name.startswith(("bbox_head.", "itm_head.")))
    model.vision_encoder.eval()
    model.text_encoder.embeddings.eval()
    for layer in model.text_encoder.encoder.layer[: model.cfg.text.fusion_layer]:
        layer.eval()


def make_optimizer(model: XVLM, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; no decay on biases, LayerNorms and BERT's embeddings (by name:
    the ViT position table is 3-D and decays like a weight matrix, as it did for every shipped model)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 and "embeddings" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def stage_starts(recipe: Recipe) -> list[int]:
    """The global step at which each stage starts."""
    return [sum(s.steps for s in recipe.stages[:i]) for i in range(len(recipe.stages))]


# --- processes and seeds ------------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(recipe: Recipe, rank: int, step: int) -> int:
    """The torch seed of a step (masking, negatives, dropout): a function of (seed, rank, step), so runs resume."""
    return hash((recipe.seed, rank, step)) % 2**63


# --- the run folder -----------------------------------------------------------------------------------------------
def save_model_folder(model: XVLM, run_dir: Path, dest: Path) -> None:
    """A loadable model folder (safetensors + config + the run's vocabulary)."""
    save_pretrained(model, dest, vocab=run_dir / "vocab.txt")


def save_training_state(path: Path, model: XVLM, optimizer, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    tmp.replace(path)   # atomic: a crash mid-save never leaves a half-written checkpoint


def export(run_dir: str | Path, dest: str | Path) -> None:
    """Copy a finished run's model (safetensors + config + vocab) to a model folder such as weights/xvlm-shapes."""
    src, dest = Path(run_dir) / "final", Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        (dest / name).write_bytes((src / name).read_bytes())


def run_config(recipe: Recipe, tokenizer: Tokenizer, source) -> XVLMConfig:
    """The recipe's model with the run's vocabulary size, and the source's closed word list when it has one."""
    base = model_config(recipe)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=tokenizer.vocab_size))
    words = getattr(source, "words", None)
    return cfg if words is None else dataclasses.replace(cfg, words=tuple(words))


def _open_run_folder(out: Path, recipe: Recipe, vocab: str | None, rank: int, world: int) -> Tokenizer:
    """Create the folder and its vocab.txt (rank 0) and seed every generator; every rank's tokenizer."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    set_seed(recipe.seed + rank)
    base = model_config(recipe)
    tokenizer = make_tokenizer(out, base, vocab) if rank == 0 else None
    _barrier(world)
    if tokenizer is None:
        tokenizer = Tokenizer(out / "vocab.txt", max_tokens=base.max_tokens, max_words=base.max_words)
    return tokenizer


def _write_recipe(out: Path, recipe: Recipe, cfg: XVLMConfig, world: int) -> None:
    with open(out / "recipe.json", "w") as f:
        json.dump({"recipe": dataclasses.asdict(recipe), "model": cfg.to_dict(), "world_size": world}, f, indent=2)


def _restore(model: XVLM, ckpt_path: Path, recipe: Recipe, resume: bool, init, start_stage: str | None,
             rank: int) -> tuple[int, dict | None]:
    """(the first step to run, the checkpoint's state or None): from checkpoint.pt when resuming, else from `init`
    at `start_stage`'s first step, else from step 0."""
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {int(state['step'])}")
        return int(state["step"]), state
    if init is None:
        return 0, None
    names = [s.name for s in recipe.stages]
    if start_stage not in names:
        raise ValueError(f"--start-stage must be one of {names} with --init, got {start_stage!r}")
    from ..checkpoint import load_pretrained, load_state_strict, state_for_grid
    load_state_strict(model, state_for_grid(load_pretrained(init), model), str(init))
    start = stage_starts(recipe)[names.index(start_stage)]
    if rank == 0:
        print(f"initialised from {init}; starting at stage {start_stage} (step {start})")
    return start, None


# --- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every part of one process' run reads."""
    recipe: Recipe
    out: Path
    rank: int
    world: int
    device: torch.device
    model: XVLM
    objective: Pretrainer
    source: object
    tokenizer: Tokenizer
    cfg: XVLMConfig
    ckpt_every: int
    max_minutes: float | None
    log: TextIO | None = None
    bar: tqdm | None = None
    t0: float = 0.0

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.recipe.stages)


def train(recipe: Recipe, out: str | Path, source=None, vocab: str | None = None, resume: bool = True,
          ckpt_every: int = 200, max_minutes: float | None = None, progress: bool = True,
          init: str | Path | None = None, start_stage: str | None = None,
          loader_workers: int | None = None) -> XVLM:
    """Run (or resume) a recipe. `init` + `start_stage`: begin at that stage from a saved model folder (each stage
    starts a fresh optimizer, so this equals running the earlier stages, given their weights)."""
    out = Path(out)
    rank, world, device = setup_distributed()
    tokenizer = _open_run_folder(out, recipe, vocab, rank, world)
    source = source or SyntheticSource(recipe.seed, recipe.corpus)
    cfg = run_config(recipe, tokenizer, source)
    torch.manual_seed(recipe.seed)                     # identical initial weights on every rank
    model = XVLM(cfg).to(device)
    run = _Run(recipe, out, rank, world, device, model, Pretrainer(model, tokenizer, recipe.mask_prob), source,
               tokenizer, cfg, ckpt_every, max_minutes)
    if rank == 0:
        _write_recipe(out, recipe, cfg, world)
    start, state = _restore(model, run.ckpt_path, recipe, resume, init, start_stage, rank)
    if loader_workers is None:
        loader_workers = min(4, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0
    with contextlib.ExitStack() as closing:
        run.log = closing.enter_context(open(out / "log.jsonl", "a")) if rank == 0 else None
        run.bar = closing.enter_context(tqdm(total=run.total_steps, initial=start, disable=not progress or rank != 0,
                                             dynamic_ncols=True))
        batches = step_batches(StepBatches(source, recipe, rank, tokenizer, cfg), start, loader_workers)
        finished = _run_stages(run, batches, start, state)
    if not finished:
        return model.eval()
    model.eval()
    model.requires_grad_(True)
    if rank == 0:
        save_model_folder(model, out, out / "final")
    _barrier(world)
    return model


def _run_stages(run: _Run, batches: Iterator[dict], start: int, state: dict | None) -> bool:
    """Steps `start`... to the recipe's end; False when --max-minutes stopped the run (with a checkpoint)."""
    run.t0 = time.time()
    step = start
    run.model.train()
    for stage_index, (stage, first) in enumerate(zip(run.recipe.stages, stage_starts(run.recipe))):
        if step >= first + stage.steps:
            continue
        optimizer, objective = _begin_stage(run, stage_index, first, step, state)
        for step in range(max(step, first), first + stage.steps):
            values = _train_step(run, objective, optimizer, stage, step - first, step, batches)
            if not _after_step(run, optimizer, stage, step - first, step + 1, values):
                return False
        step = first + stage.steps
        if run.rank == 0:   # every stage's end stays evaluable: python -m xvlm eval --model RUN/stages/NAME
            save_model_folder(run.model, run.out, run.out / "stages" / stage.name)
    return True


def _begin_stage(run: _Run, stage_index: int, first: int, step: int,
                 state: dict | None) -> tuple[torch.optim.Optimizer, nn.Module]:
    """The stage's losses, trainable parameters and a fresh optimizer (as a fine-tuning run), restored from the
    checkpoint when resuming inside the stage; the cross-attention alignment when the stage starts with it."""
    stage = run.recipe.stages[stage_index]
    run.objective.set_stage(stage)
    set_trainable(run.model, stage)
    optimizer = make_optimizer(run.model, stage.lr, run.recipe.weight_decay)
    if state is not None and first < int(state["step"]) < first + stage.steps:
        optimizer.load_state_dict(state["optimizer"])
    objective = (nn.parallel.DistributedDataParallel(run.objective, find_unused_parameters=True)
                 if run.world > 1 else run.objective)
    if stage.align_cross_attention and step == first:
        probe = align_probe_batch(run.source, run.recipe, stage_index, run.rank, run.tokenizer, run.cfg)
        scale = align_cross_attention(run.model, {k: v.to(run.device) for k, v in probe.items()})
        if run.rank == 0:
            print(f"stage {stage.name}: cross-attention aligned with ITC (scale {scale:.3f})")
    return optimizer, objective


def _train_step(run: _Run, objective: nn.Module, optimizer: torch.optim.Optimizer, stage: Stage, stage_step: int,
                step: int, batches: Iterator[dict]) -> dict[str, float]:
    """One optimisation step on global step `step`'s batch; its losses, rounded for the log."""
    torch.manual_seed(step_seed(run.recipe, run.rank, step))
    batch = {k: v.to(run.device) for k, v in next(batches).items()}
    for group in optimizer.param_groups:
        group["lr"] = lr_at(stage_step, stage)
    out_losses = objective(batch)
    loss = run.objective.total(out_losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], run.recipe.grad_clip)
    optimizer.step()
    return {k: round(v.item(), 4) for k, v in out_losses.items()}


def _after_step(run: _Run, optimizer: torch.optim.Optimizer, stage: Stage, stage_step: int, done: int,
                values: dict[str, float]) -> bool:
    """Progress, log line and checkpoint after `done` steps; False when --max-minutes is up (checkpoint saved)."""
    run.bar.set_postfix(stage=stage.name, **values)
    run.bar.update(1)
    if run.log is not None:
        run.log.write(json.dumps({"step": done, "stage": stage.name, "lr": lr_at(stage_step, stage),
                                  "elapsed_s": round(time.time() - run.t0, 1), **values}) + "\n")
        run.log.flush()
    if run.rank == 0 and (done % run.ckpt_every == 0 or done == run.total_steps):
        save_training_state(run.ckpt_path, run.model, optimizer, done)
    if run.max_minutes is not None and (time.time() - run.t0) / 60 > run.max_minutes:
        if run.rank == 0:
            save_training_state(run.ckpt_path, run.model, optimizer, done)
            print(f"stopping after {run.max_minutes} min at step {done}; rerun to resume")
        return False
    return True
