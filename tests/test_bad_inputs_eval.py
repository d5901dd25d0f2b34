"""Bad inputs to evaluation, through the real eval.py (tests/bad_inputs.py): few-shot evaluation of a whole split,
unreadable images that affect many captions (stopped past data.max_bad_fraction, counted below it), an empty class
folder, --out left intact by a failure; and data workers that end with a SIGKILLed parent."""
import dataclasses
import json
import signal
import textwrap

import pytest
import torch

from crossmodal import train
from tests.bad_inputs import fingerprint, refused, run
from tests.test_data_formats import write_csv, write_images
from tests.test_train import small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory, tokenizer_path) -> str:  # noqa: F811
    folder = tmp_path_factory.mktemp("clip")
    train.main(small_run(folder, tokenizer_path, "--train.steps=1"))
    return str(folder / "checkpoint.pt")


@pytest.fixture(scope="module")
def flamingo_checkpoint(tmp_path_factory) -> str:
    """A random Flamingo-tiny (32 px) saved as train.py saves a run."""
    from crossmodal.config import load_config
    from crossmodal.data import build_dataset
    from crossmodal.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from crossmodal.recipes import recipe_for

    folder = tmp_path_factory.mktemp("flamingo")
    texts = [build_dataset("shapes_icl:train:300").text_only(i) for i in range(300)]
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts, folder / "tok", 400, flamingo_tokens=True),
                                       context_length=96)
    cfg = load_config(None, ["--model.name=Flamingo-tiny", "--data.image_size=32", "--data.context_length=96",
                             "--data.tokenizer=sentencepiece", "--data.train=shapes_icl:train"])
    torch.manual_seed(0)
    model = recipe_for(cfg).build_model(tokenizer, pretrained=False)
    path = folder / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                "tokenizer": tokenizer.model_bytes()}, path)
    return str(path)


def test_fewshot_on_a_whole_split(flamingo_checkpoint):
    # shapes_icl:val has as many episodes as images: the pool used to be the images after the queries, none here.
    # The demonstrations now come from the train split; --num-queries keeps the run to seconds.
    result = run(["eval.py", "--checkpoint", flamingo_checkpoint, "--task", "fewshot_vqa", "--data", "shapes_icl:val",
                  "--shots", "0", "2", "--seeds", "1", "--num-queries", "8", "--batch-size", "8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0-shot accuracy" in result.stdout and "2-shot accuracy" in result.stdout
    assert "pool_size                2048" in result.stdout


def test_fewshot_on_a_split_too_small_for_its_shots(flamingo_checkpoint):
    result = run(["eval.py", "--checkpoint", flamingo_checkpoint, "--task", "fewshot_vqa", "--data", "shapes:val:3",
                  "--shots", "4", "--seeds", "1"])
    refused(result, "shapes:val:3", "4 demonstrations per query", "holds 2 examples besides the query")


def unreadable_retrieval_set(folder, unreadable_captions: int = 30, total: int = 40) -> str:
    """A csv of `total` captions, `unreadable_captions` of them of one image that cannot be decoded."""
    names = write_images(folder / "images", total - unreadable_captions)
    (folder / "images" / "broken.jpg").write_bytes(b"not an image")
    rows = [f"images/broken.jpg,a broken picture number {i}" for i in range(unreadable_captions)]
    rows += [f"images/{name},a picture number {i}" for i, name in enumerate(names)]
    return "csv:" + write_csv(folder / "pairs.csv", rows)


def test_retrieval_stops_past_max_bad_fraction(tmp_path, clip_checkpoint):
    spec = unreadable_retrieval_set(tmp_path)
    out = tmp_path / "retrieval.json"
    out.write_text('{"previous": "results"}')
    before = fingerprint(str(out))
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "retrieval", "--data", spec, "--out", str(out)])
    refused(result, spec, "30 of 40 captions with an unreadable image", "data.max_bad_fraction=0.01")
    assert fingerprint(str(out)) == before  # the previous results intact


def test_retrieval_below_max_bad_fraction_counts_the_affected_captions_as_misses(tmp_path, clip_checkpoint):
    spec = unreadable_retrieval_set(tmp_path)
    out = tmp_path / "retrieval.json"
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "retrieval", "--data", spec, "--out", str(out),
                  "--data.max_bad_fraction=0.8"])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert (results["bad_images"], results["affected_captions"], results["num_texts"]) == (1, 30, 40)
    assert results["text_to_image_R@10"] <= 25.0  # the 30 captions of the unreadable image are misses
    assert results["image_to_text_R@10"] <= 100.0 * 10 / 11 + 1e-4  # and its own query
    assert "broken.jpg" in result.stderr


def test_an_empty_class_folder_is_not_a_class(tmp_path, clip_checkpoint):
    for folder in ("red_square", "blue_circle"):
        write_images(tmp_path / "classes" / folder, 2, prefix=folder)
    (tmp_path / "classes" / "green_star").mkdir()
    out = tmp_path / "zeroshot.json"
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "zeroshot", "--data",
                  f"imagefolder:{tmp_path / 'classes'}", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert (results["num_classes"], results["num_images"], results["empty_class_folders"]) == (2, 4, 1)
    assert results["chance"] == 50.0 and "green_star" in result.stderr


def test_out_left_intact_by_a_bad_value(tmp_path, clip_checkpoint):
    out = tmp_path / "results.json"
    out.write_text('{"previous": "results"}')
    before = fingerprint(str(out))
    result = run(["eval.py", "--checkpoint", clip_checkpoint, "--task", "retrieval", "--data", "shapes:val:8",
                  "--out", str(out), "--batch-size", "0"])
    refused(result, "--batch-size must be at least 1")
    assert fingerprint(str(out)) == before


def test_a_sigkilled_parent_leaves_no_data_worker(tmp_path):
    pids = tmp_path / "workers"
    script = textwrap.dedent(f"""
        import os, time
        from torch.utils.data import Dataset
        from crossmodal.data import _loader

        class Slow(Dataset):
            def __len__(self):
                return 10_000

            def __getitem__(self, index):
                with open({str(pids)!r}, "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
                time.sleep(600)  # busy in a read (a stalled network file system): torch's own check that the
                return index     # parent lives runs only between items

        for index in _loader(Slow(), None, 2, batch_size=1):
            pass
    """)
    # (the margin is for importing torch on a loaded machine; run fails the test if a worker outlives the parent)
    result = run(["-c", script], signal_after=(30.0, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL
    assert pids.exists(), "the workers had not started when the parent was killed"
    assert len(set(pids.read_text().split())) == 2  # both workers had started (and run saw none of them left)
