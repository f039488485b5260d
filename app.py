"""Start the X-VLM grounding demo:  python app.py  [options]

With no option it serves the shipped default model (weights/xvlm-shapes/, nothing is downloaded). Also the entry
point of a Hugging Face Space (same file; the GPU is used when the Space has one).

Options (each also an environment variable, the flag wins):
    --checkpoint FILE   XVLM_CHECKPOINT   an official X-VLM or X²-VLM checkpoint (e.g. checkpoint_best.pth) ...
    --config YAML       XVLM_CONFIG       ... shaped by its official task YAML (e.g. configs/Grounding_bbox.yaml)
    --preset NAME       XVLM_PRESET       ... or by a built-in preset (xvlm-base-refcoco-bbox, x2vlm-large-1b, ...)
    --tokenizer VOCAB   XVLM_TOKENIZER    ... with the bert-base-uncased vocab.txt (or its folder)
    --model DIR         XVLM_MODEL        a model folder in our format (config.json + model.safetensors + vocab.txt)
                                          or a Hugging Face Hub model repo id org/name (HF_HUB_OFFLINE=1: cache only)
    --revision REV      XVLM_REVISION     ... the Hub repo's branch, tag or commit
    --scorer DIR        XVLM_SCORER       ... scored by a second model folder / Hub repo with ITC/ITM heads (for a
                                          box-only model: ITC heatmaps, ITM, Grad-CAM beside its boxes)
    --scorer-checkpoint FILE  XVLM_SCORER_CHECKPOINT  ... the same for --checkpoint: an official pre-trained
                                          checkpoint (same config) whose ITC/ITM heads score the boxes
    --precision P       XVLM_PRECISION    fp32 (default, exact) | bf16 (autocast) | int8 (CPU, dynamic quantisation)
    --compile           XVLM_COMPILE=1    torch.compile the vision encoder (worth it on a GPU; slow first load)
    --host, --port, --share               where to serve (default 127.0.0.1:7860; 0.0.0.0 on a Space)
Each model is warmed up with one query on a blank image when it loads, so the first user does not wait for it.
Models named by flags come first in the model selector (the first one is selected); the default model follows when
present. Limits (phrases, upload size, queue) are in xvlm/limits.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from app.models import ModelRegistry, ModelUnavailable, missing_default_message, options_from_env, specs_from_options
from xvlm.limits import QUEUE_CONCURRENCY, QUEUE_MAX_SIZE


def parse_args(argv=None, env=None) -> argparse.Namespace:
    env = os.environ if env is None else env
    defaults = options_from_env(env)
    on_space = bool(env.get("SPACE_ID"))
    p = argparse.ArgumentParser(description="X-VLM visual grounding demo (Gradio)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default=defaults["checkpoint"],
                   help="official X-VLM or X²-VLM checkpoint (.pth/.th)")
    p.add_argument("--config", default=defaults["config"], help="official task YAML for --checkpoint")
    p.add_argument("--preset", default=defaults["preset"], help="built-in config preset for --checkpoint")
    p.add_argument("--tokenizer", default=defaults["tokenizer"], help="vocab.txt (or folder) for --checkpoint")
    p.add_argument("--model", default=defaults["model"], help="model folder in our format, or a Hub repo id")
    p.add_argument("--revision", default=defaults["revision"], help="Hub revision of --model")
    p.add_argument("--scorer", default=defaults["scorer"],
                   help="with --model: a model folder or Hub repo id whose ITC/ITM heads score its boxes")
    p.add_argument("--scorer-checkpoint", default=defaults["scorer_checkpoint"],
                   help="with --checkpoint: an official checkpoint whose ITC/ITM heads score its boxes")
    p.add_argument("--precision", default=defaults["precision"] or "fp32", choices=("fp32", "bf16", "int8"),
                   help="inference precision of every model (default fp32)")
    p.add_argument("--host", default=env.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT") or 7860))
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--compile", action="store_true", default=env.get("XVLM_COMPILE", "") in ("1", "true", "yes"),
                   help="torch.compile each model's vision encoder (GPU)")
    return p.parse_args(argv)


def build_registry(args: argparse.Namespace) -> ModelRegistry:
    specs = specs_from_options(checkpoint=args.checkpoint, preset=args.preset, config=args.config,
                               tokenizer=args.tokenizer, model=args.model, revision=args.revision,
                               precision=args.precision, scorer=args.scorer,
                               scorer_checkpoint=args.scorer_checkpoint)
    if not specs:
        raise ModelUnavailable(missing_default_message())
    for spec in specs:
        bad = spec.problems()
        if bad:
            raise ModelUnavailable(f"model '{spec.name}': " + "; ".join(bad))
    return ModelRegistry(specs, compile=args.compile)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        registry = build_registry(args)
        print(f"[xvlm-demo] models: {', '.join(registry.names)}; loading '{registry.default}' ...", flush=True)
        registry.get(registry.default)          # fail early on a broken file; the others load when selected
    except ModelUnavailable as e:
        print(f"[xvlm-demo] cannot start: {e}", file=sys.stderr)
        return 2
    from app.ui import build_demo, launch_kwargs, limit_malloc_arenas

    limit_malloc_arenas()
    demo = build_demo(registry)
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
