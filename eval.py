"""Evaluate a model the way its paper reports it: load a checkpoint (or released weights), get its family's recipe,
run the --task it names, print a table and write the JSON file. The tasks themselves live in evaluation/.

A checkpoint that train.py wrote (it carries its config and tokenizer):
    python eval.py --checkpoint RUN/checkpoint.pt --task zeroshot --data shapes:val --out zs.json
    python eval.py --checkpoint RUN/checkpoint.pt --task retrieval --data coco:PATH/dataset_coco.json#test

Released weights, by tag (downloaded once to $CROSSMODAL_CACHE and verified; CROSSMODAL_OFFLINE=1: the cache only):
    python eval.py --model ViT-B-32 --pretrained openai --task zeroshot --data imagefolder:PATH/imagenet/val \
        --classnames imagenet

or from local files (no network, no HuggingFace):
    python eval.py --model ViT-B-32-quickgelu --pretrained ViT-B-32.pt --task zeroshot \
        --data imagefolder:PATH/imagenet/val --classnames imagenet
    python eval.py --model BLIP-base --pretrained model_base.pth --vocab vocab.txt --task retrieval --data ...
    python eval.py --model OpenFlamingo-3B-vitl-mpt1b --pretrained checkpoint.pt --vision ViT-L-14.pt \
        --lm mpt-1b-redpajama-200b --task fewshot_caption --data coco:PATH/dataset_coco.json#test --shots 0 4 8

Tasks by family: CLIP and SigLIP zeroshot, retrieval, linear_probe (evaluation/contrastive.py, probe.py) and
binding on shapes:binding (evaluation/binding.py); the predictive baselines zeroshot, linear_probe; BLIP also
retrieval with ITM re-ranking, binding by ITC and ITM, caption and vqa (evaluation/blip.py); the language model
words_rule, Flamingo fewshot_vqa and fewshot_caption (evaluation/fewshot.py). A task the model's family does not
have is a one-line error naming the tasks it has.

Extra `--data.KEY=VALUE` arguments override the data config (e.g. `--data.image_root=/data/coco`).
"""
import argparse
import contextlib
import json
import os

import torch

from crossmodal.config import fail, load_config, parse_overrides
from crossmodal.data.templates import load_classnames, load_templates
from crossmodal.evaluation.probe import scalar_metrics
from crossmodal.files import shown, write_atomic
from crossmodal.recipes import load_released, load_run, recipe_for
from crossmodal.recipes.clip import BPE_FILE
from crossmodal.recipes.registry import family_tasks, image_size_problem


def all_tasks() -> list[str]:
    return sorted({task for tasks in family_tasks().values() for task in tasks})


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", help="a train.py checkpoint: RUN/checkpoint.pt, or an FSDP run's folder RUN/checkpoint")
    add("--model", help="a preset for released weights, e.g. ViT-B-32-quickgelu, BLIP-base, OpenFlamingo-3B-vitl-mpt1b")
    add("--pretrained", help="with --model: an OpenAI .pt file or an open_clip checkpoint (BLIP: salesforce's .pth or "
                             "a HF folder; Flamingo: OpenFlamingo's checkpoint.pt), or a released tag (openai, "
                             "laion2b_s34b_b79k, ...; crossmodal.hub.RELEASED), downloaded to $CROSSMODAL_CACHE")
    add("--bpe", help=f"with a CLIP --model: the vocabulary {BPE_FILE} (default: next to --pretrained, else open_clip's)")
    add("--vocab", help="with a BLIP --model: BERT's vocab.txt (default: the one in or next to --pretrained)")
    add("--vision", help="with a Flamingo --model: the CLIP checkpoint of its vision tower")
    add("--lm", help="with a Flamingo --model: the language model's HuggingFace folder (config.json, weights, "
                     "tokenizer.json), e.g. mpt-1b-redpajama-200b")
    add("--task", required=True, help=f"one of {', '.join(all_tasks())} (which ones depends on the model's family)")
    add("--data", help="dataset spec (default: the run's data.val); linear_probe: the training split")
    add("--val", help="linear_probe: the split that chooses the L2 strength (default: 20%% of --data)")
    add("--test", help="linear_probe: the split reported on (default: --val)")
    add("--shots", type=int, nargs="*", default=None,
        help="linear_probe: also k-shot probes with k images per class; fewshot_*: demonstrations per query")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2],
        help="linear_probe and fewshot_*: k-shot draws (a number N for fewshot_*: seeds 0..N-1)")
    add("--rices", action="store_true", help="fewshot_*: similar demonstrations, not random ones")
    add("--num-queries", type=int, help="fewshot_*: evaluate this many queries (default: all)")
    add("--templates", help="zero-shot prompts: imagenet, shapes, or a file with one per line")
    add("--classnames", help="zero-shot class names: imagenet, or a file with one per line in class-index order "
                             "(default: the dataset's own)")
    add("--k-test", type=int, default=256, help="retrieval with ITM: candidates per query re-ranked (BLIP: 256 COCO)")
    add("--num-beams", type=int, default=3, help="caption and vqa generate: beam width")
    add("--max-length", type=int, default=20, help="caption: tokens, prompt included")
    add("--min-length", type=int, default=5, help="caption: tokens, prompt included")
    add("--prompt", default="a picture of ", help="caption: the decoder's prompt, stripped from the output")
    add("--vqa-mode", default="rank", choices=("rank", "generate"),
        help="vqa: rank candidate answers by likelihood (BLIP's default) or generate them")
    add("--answers", help="vqa rank: candidate answers, a JSON list or one a line (default: the answers of --data)")
    add("--answer-k", type=int, default=128, help="vqa rank: candidates kept by first-token probability (BLIP: 128)")
    add("--log-every", type=int, default=10, help="progress line every N batches (0: none)")
    add("--batch-size", type=int, default=256)
    add("--workers", type=int, default=0, help="DataLoader worker processes")
    add("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype (fp16 needs a GPU)")
    add("--out", help="write the results to this JSON file")
    add("--device", default="cpu")
    args, overrides = parser.parse_known_args(argv)
    if bool(args.checkpoint) == bool(args.model) or bool(args.model) != bool(args.pretrained):
        parser.error("give either --checkpoint (a train.py run) or --model with --pretrained (released weights)")
    if any(not arg.startswith("--data.") for arg in overrides if arg.startswith("--")):
        parser.error(f"unrecognised arguments: {' '.join(overrides)} (only --data.KEY=VALUE overrides are passed on)")
    for option, least in (("batch_size", 1), ("workers", 0), ("k_test", 1), ("num_beams", 1), ("max_length", 1),
                          ("min_length", 0), ("answer_k", 1), ("num_queries", 1), ("log_every", 0), ("shots", 0),
                          ("seeds", 0)):
        values = getattr(args, option)
        if any(value < least for value in (values if isinstance(values, list) else [values] if values is not None
                                           else [])):
            fail(f"eval.py: --{option.replace('_', '-')} must be at least {least}; got {values}")
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
        fail(f"eval.py: --out {shown(args.out)}: not a file in an existing folder")
    return args, overrides


def load(args):
    """(config, model, tokenizer) of --checkpoint or --model/--pretrained."""
    if args.checkpoint:
        return load_run(args.checkpoint, args.device)
    return load_released(args.model, args.pretrained, args.device, bpe=args.bpe, vocab=args.vocab, vision=args.vision,
                         lm=args.lm)


def print_table(title: str, results: dict) -> None:
    print(title)
    width = max(len(name) for name in results)
    for name, value in results.items():
        print(f"  {name:<{width}}  {value:8.2f}" if isinstance(value, float) else f"  {name:<{width}}  {value:>8}")


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    try:
        for name, check in ((args.classnames, load_classnames), (args.templates, load_templates)):
            if name:
                check(name)  # a typo fails before the model loads
        cfg, model, tokenizer = load(args)
        recipe = recipe_for(cfg)
        if args.task not in recipe.tasks:
            others = [name for name, tasks in family_tasks().items() if args.task in tasks]
            raise ValueError(f"a {cfg.model.name} model ({type(recipe).__name__}) cannot do --task {args.task}; its "
                             f"tasks: {', '.join(recipe.tasks) or 'none'}" +
                             (f" (--task {args.task} is {' and '.join(others)}'s)" if others else ""))
        problem = recipe.check_task(args.task, model)
        if problem:
            raise ValueError(problem)
        data_cfg = load_config(None, overrides).data
        for key, _ in parse_overrides(overrides):  # only the keys the user named; the rest keep the run's
            setattr(cfg.data, key[len("data."):], getattr(data_cfg, key[len("data."):]))
        problem = image_size_problem(cfg)
        if problem:
            raise ValueError(problem)
        spec = args.data or cfg.data.val
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        autocast = torch.autocast(torch.device(args.device).type, dtype) if dtype else contextlib.nullcontext()
        with autocast:
            results = recipe.run_task(args.task, model, tokenizer, spec, args)
    except (FileNotFoundError, ValueError) as error:  # bad input (a config.BadInput too): one line, no traceback
        fail(f"eval.py: {error}")
    source = {"checkpoint": args.checkpoint} if args.checkpoint else {"model": args.model, "pretrained": args.pretrained}
    table = scalar_metrics(results)
    print_table(f"{args.task} on {spec} ({', '.join(f'{k} {v}' for k, v in source.items())})", table)
    if args.out:  # through a temporary file: a failure leaves the previous results as they were
        write_atomic(args.out, json.dumps({"task": args.task, "data": spec, **source, **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
