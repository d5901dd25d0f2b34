"""CLIP tokenizer speed against open_clip's on the zero-shot ImageNet prompts (80 templates x 1000 classes).

    python benchmarks/bench_tokenizer.py

Both tokenizers run in this process on the same 80,000 prompts, alternately, `--rounds` times each; the
table shows the median seconds and checks that the ids are identical. open_clip is a test-only
dependency (`pip install -e ".[dev]"`); its vocabulary file is the one both read.
Tokenizing does no floating-point work, so the matmul peak says nothing here; the limit beside both is the least
per-character work any tokenizer of these prompts does (lower-case and UTF-8-encode each one, in Python, the same
median), and each side's share of it (limit time / its time).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import open_clip

    from crossmodal.data.templates import load_classnames, load_templates
    from crossmodal.data.tokenizer import ClipTokenizer

    prompts = [template.format(name) for name in load_classnames("imagenet") for template in load_templates("imagenet")]
    tokenizers = {"ours": None, "open_clip": open_clip.get_tokenizer("ViT-B-32")}
    times, outputs = {name: [] for name in tokenizers}, {}
    for _ in range(args.rounds):
        for name in tokenizers:
            start = time.perf_counter()
            if name == "ours":  # a fresh one each round: its word cache starts empty, as open_clip's is not
                tokenizers[name] = ClipTokenizer(open_clip.tokenizer.default_bpe())
                start = time.perf_counter()
            outputs[name] = tokenizers[name](prompts)
            times[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["open_clip"])
    limits = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        [prompt.lower().encode() for prompt in prompts]
        limits.append(time.perf_counter() - start)
    limit = statistics.median(limits)
    print(f"{len(prompts)} prompts, median of {args.rounds} rounds, backends {tokenizers['ours'].backends}")
    print("| tokenizer | seconds | speed-up | same ids | share of the limit (lower + encode alone: "
          f"{limit:.3f} s) |")
    print("|---|---|---|---|---|")
    print(f"| open_clip SimpleTokenizer | {theirs:.2f} | 1.00x | | {100 * limit / theirs:.1f}% |")
    same = bool((outputs["ours"] == outputs["open_clip"]).all())
    print(f"| ours (ClipTokenizer) | {ours:.2f} | {theirs / ours:.1f}x | {same} | {100 * limit / ours:.1f}% |")


if __name__ == "__main__":
    main()
