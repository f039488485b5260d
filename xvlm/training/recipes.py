"""Training recipes as data: a recipe names its model and lists its stages; a run is a pure function of (recipe, seed).

The evidence behind each setting (measured runs, times, accuracies) is in weights/README.md, the model card; the
comments here give the reason in a line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import XVLMConfig
from ..data.synthetic import REFEXP_KINDS
from ..registry import get_model_config


@dataclass
class Stage:
    name: str
    steps: int
    lr: float
    loss_weights: dict[str, float]            # itc, itm, itm_image, itm_caption, mlm, bbox (L1 + GIoU), attn; 0 off
    phrase_kinds: tuple[str, ...]             # which phrases become concepts: object, region, attribute, ...
    phrases_per_image: int = 4
    warmup: int = 100
    align_cross_attention: bool = False       # start by pointing fusion attention where patch ITC is high
    trainable: str = "all"                    # "all", or "fusion": fusion layers + ITM/bbox heads, encoders frozen
    unique_box_targets: bool = False          # bbox/attn losses only on concepts that are box targets (one object)
    absent_per_image: int = 0                 # texts naming what the image lacks, as its own itm_image negatives

    def __post_init__(self):
        if self.absent_per_image and not self.loss_weights.get("itm_image"):
            raise ValueError(f"stage {self.name!r}: absent_per_image needs the itm_image loss, which reads them")

    def takes(self, kind: str) -> bool:
        """Whether a phrase of this kind may become one of the stage's concepts: the kinds it names, and any kind no
        recipe can name (user data's, e.g. 'refexp')."""
        return kind in self.phrase_kinds or kind not in ALL_KINDS


@dataclass
class Recipe:
    model: str | XVLMConfig                   # a model name (`model_config`), or a configuration
    stages: list[Stage]
    batch_images: int = 24
    mask_prob: float = 0.25
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    corpus: str = "train"                     # the synthetic corpus' style: 'train', or 'varied' (xvlm.data.varied)


ALL_KINDS = ("object", "region") + REFEXP_KINDS   # the phrase kinds a stage can select

def model_config(recipe: Recipe) -> XVLMConfig:
    """The configuration of the model a recipe trains (before the run sets its vocabulary)."""
    if isinstance(recipe.model, XVLMConfig):
        return recipe.model
    return get_model_config(recipe.model)      # the registry: xvlm/model_configs/<name>.json


RECIPES: dict[str, Recipe] = {
    # The 90-minute CPU recipe (2-core CPU, nothing else running). More steps need more time ("shapes-cycle2", the
    # shipped model) or a faster machine (--steps-scale).
    "shapes": Recipe(model="shapes", batch_images=24, stages=[
        Stage("pretrain", steps=1000, lr=4e-4, loss_weights={"itc": 1, "itm": 1, "mlm": 1, "bbox": 1},
              phrase_kinds=ALL_KINDS, phrases_per_image=4),
        # Encoders trained with the box: concept features must learn object extent, which a frozen encoder cannot.
        # The attention-guidance loss keeps one fusion head on the target's patches from the start. No ITM (as the
        # official grounding fine-tuning): its hard negatives were 40% of a step and the boxes learned faster per
        # minute without it. ITC stays, so the heatmaps keep their meaning. 6500 steps: what the 90 minutes hold.
        Stage("grounding", steps=6500, lr=2e-4,
              loss_weights={"itc": 0.5, "bbox": 1, "attn": 1},
              phrase_kinds=REFEXP_KINDS + ("object",), phrases_per_image=6, warmup=50, align_cross_attention=True,
              unique_box_targets=True),
        # Encoders frozen (ITC features and heatmaps stay as stage 2 left them): fusion and heads settle on them,
        # with 8 box queries per image, and ITM of each phrase against whole images (`itm_image`), the pair the
        # demo's ITM score is read from. lr 1e-4: at 3e-4 this stage lost boxes.
        Stage("grounding-fusion", steps=500, lr=1e-4,
              loss_weights={"itm": 0.5, "itm_image": 0.5, "bbox": 1, "attn": 1},
              phrase_kinds=REFEXP_KINDS + ("object",), phrases_per_image=8, warmup=50, trainable="fusion",
              unique_box_targets=True),
    ]),
    # A few steps of a tiny model: tests and smoke runs.
    "shapes-tiny": Recipe(model="shapes-tiny", batch_images=4, stages=[
        Stage("pretrain", steps=3, lr=1e-3, loss_weights={"itc": 1, "itm": 1, "mlm": 1, "bbox": 1},
              phrase_kinds=ALL_KINDS, phrases_per_image=2, warmup=1),
        Stage("grounding", steps=2, lr=1e-3, loss_weights={"itc": 0.5, "mlm": 0, "bbox": 1, "attn": 1},
              phrase_kinds=REFEXP_KINDS + ("object",), phrases_per_image=2, warmup=1,
              align_cross_attention=True),
        Stage("grounding-fusion", steps=2, lr=1e-3,
              loss_weights={"itm": 0.5, "itm_image": 0.5, "bbox": 1, "attn": 1},
              phrase_kinds=REFEXP_KINDS + ("object",), phrases_per_image=2, warmup=1, trainable="fusion",
              unique_box_targets=True)]),
}

# "shapes" on a 16x16 grid, for a machine with steps to spare, e.g. a GPU with `--steps-scale 4`: per step it reads
# shapes better than "shapes"; in the CPU budget it loses for want of steps.
RECIPES["shapes-grid16"] = dataclasses.replace(RECIPES["shapes"], model="shapes-grid16")


def second_cycle(recipe: Recipe, seed: int = 1) -> Recipe:
    """The recipe's stages again, for `--init` from its own model: new scenes, and no cross-attention alignment (it
    would zero the trained fusion self-attention)."""
    return dataclasses.replace(recipe, seed=seed, stages=[
        dataclasses.replace(s, align_cross_attention=False) for s in recipe.stages])


def with_stage_steps(recipe: Recipe, **steps: int) -> Recipe:
    """The recipe with some stages' step counts replaced (by stage name; '-' in a name is '_' here)."""
    return dataclasses.replace(recipe, stages=[
        dataclasses.replace(s, steps=steps.get(s.name.replace("-", "_"), s.steps)) for s in recipe.stages])


def scaled(recipe: Recipe, factor: float) -> Recipe:
    """The same recipe with every stage's steps scaled (quick runs, longer GPU runs)."""
    stages = [dataclasses.replace(s, steps=max(1, round(s.steps * factor)), warmup=max(1, round(s.warmup * factor)))
              for s in recipe.stages]
    return dataclasses.replace(recipe, stages=stages)


# The shipped weights: stages 2 and 3 once more on a "shapes" model, time the 90-minute CPU recipe cannot hold. Run
# with `--init <a "shapes" export> --start-stage grounding`.
RECIPES["shapes-cycle2"] = second_cycle(RECIPES["shapes"])

# The "shapes" recipe on the 'varied' corpus (xvlm.data.varied) on the 16x16 grid, from scratch, with one long stage
# 2: the varied corpus' smallest objects are under half a 12x12 patch at 192 px, and every lengthening of stage 2
# raised the boxes. The stage lengths fill about 5.3 of 6 CPU-hours (--stage-steps resizes stage 2); resumable: rerun
# the same command (checkpoint.pt every 200 steps; --max-minutes stops cleanly).
RECIPES["shapes-varied"] = with_stage_steps(
    dataclasses.replace(RECIPES["shapes-grid16"], corpus="varied"), pretrain=1000, grounding=12000)
# The cheaper first step: stages 2 and 3 once more on the shipped 12x12 weights, drawn from the varied corpus (run
# with --init weights/xvlm-shapes --start-stage grounding). It separates what the corpus buys from what the grid buys.
RECIPES["shapes-varied-cycle"] = dataclasses.replace(second_cycle(RECIPES["shapes"], seed=2), corpus="varied")
# The 16x16 grid without starting over: the shipped 12x12 weights with the position table resampled to the 16x16
# grid (`checkpoint.state_for_grid`, as ViTs are fine-tuned at a higher resolution), then stages 2 and 3 on the
# varied corpus. Run with --init weights/xvlm-shapes --start-stage grounding; stage 2 sized to fit one session.
RECIPES["shapes-varied-grid16-cycle"] = with_stage_steps(
    dataclasses.replace(second_cycle(RECIPES["shapes-grid16"], seed=3), corpus="varied"), grounding=3500)
# The not-found verdict (`found`, xvlm.analysis.verdict): stage 3 once more on the shapes-cycle2 model, with each
# image's absent colour + shape and shape texts as its own whole-image ITM negatives. Other images of the batch, the only
# negatives before, differ in everything; the verdict must reject "the green triangle" beside a red one. Encoders
# stay frozen (ITC scores and heatmaps do not move); the box losses stay on so the boxes keep what they learned.
# Run with --init <the shapes-cycle2 export> --start-stage verdict.
RECIPES["shapes-verdict"] = dataclasses.replace(RECIPES["shapes"], seed=4, stages=[
    dataclasses.replace(RECIPES["shapes"].stages[2], name="verdict", steps=1000, absent_per_image=4)])
# Retrieval's ITM re-rank (X-VLM's protocol: ITC top-k, then the ITM logit): the not-found stage once more with
# image-caption ITM whose negatives are the batch's captions (`itm_caption`). Until then captions were about one
# pair in ten of the `itm` loss, and whole-image ITM scored any scene's caption alike. Run with
# --init <the shapes-verdict export> --start-stage retrieval; its export is the shipped model.
RECIPES["shapes-retrieval"] = dataclasses.replace(RECIPES["shapes-verdict"], seed=5, stages=[
    dataclasses.replace(RECIPES["shapes-verdict"].stages[0], name="retrieval",
                        loss_weights={**RECIPES["shapes-verdict"].stages[0].loss_weights, "itm_caption": 1})])
