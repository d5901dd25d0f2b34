"""load_vqa reads the official VQAv2 question and annotation JSON over COCO-named images, counts the rows it
cannot use, and raises BadSample for an unreadable image, as the other datasets in data/ do."""
import json

import pytest
from PIL import Image

from crossmodal.data.bad_samples import BadSample
from crossmodal.data.vqa import VQADataset, load_vqa
from crossmodal.metrics import vqa_accuracy

COLOURS = {42: "red", 7: "blue", 1234567: "green"}


def write_vqa(folder, subtype="val2014", image_folder=None, annotations=True, extra_questions=(), extra_annotations=()):
    """Three images, four questions (two on image 42), and their ten answers each."""
    images = folder / image_folder if image_folder else folder
    images.mkdir(parents=True, exist_ok=True)
    for image_id, colour in COLOURS.items():
        Image.new("RGB", (32, 24), colour).save(images / f"COCO_{subtype}_{image_id:012d}.jpg")
    questions = [
        {"image_id": 42, "question": "What colour is the image?", "question_id": 420},
        {"image_id": 42, "question": "  Is it red?  ", "question_id": 421},
        {"image_id": 7, "question": "What colour is it?", "question_id": 70},
        {"image_id": 1234567, "question": "How many objects?", "question_id": 12345670},
        *extra_questions,
    ]
    (folder / "questions.json").write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    answers = {420: ["red"] * 8 + ["dark red", "maroon"], 421: ["yes"] * 10, 70: ["blue"] * 9 + ["navy"],
               12345670: ["1"] * 6 + ["one", "0", "1", "2"]}
    rows = [{"question_id": q, "image_id": 0, "multiple_choice_answer": a[0],
             "answers": [{"answer": x, "answer_id": i + 1} for i, x in enumerate(a)]} for q, a in answers.items()]
    (folder / "annotations.json").write_text(json.dumps({"annotations": rows + list(extra_annotations)}))
    spec = str(folder / "questions.json")
    return spec + "#" + str(folder / "annotations.json") if annotations else spec


def test_items_and_image_names(tmp_path):
    dataset = load_vqa(write_vqa(tmp_path))
    assert isinstance(dataset, VQADataset) and len(dataset) == 4 and len(dataset.image_paths) == 3
    assert dataset.image_of == [0, 0, 1, 2] and dataset.skipped_rows.bad == 0
    item = dataset[0]
    assert item["image"].mode == "RGB" and item["image"].size == (32, 24)
    assert item["image"].getpixel((5, 5))[0] > 200  # red
    assert item["question"] == "What colour is the image?" and item["question_id"] == 420
    assert item["answers"] == ["red"] * 8 + ["dark red", "maroon"] and item["answer"] == "red"
    assert item["key"] == str(tmp_path / "COCO_val2014_000000000042.jpg")
    assert dataset[1]["question"] == "Is it red?"  # stripped, like captions
    assert dataset[3]["key"].endswith("COCO_val2014_000001234567.jpg")
    assert vqa_accuracy("one", dataset[3]["answers"]) == pytest.approx(1.0)  # "one" -> "1", 7 humans agree


def test_image_root_and_subtype_folder(tmp_path):
    spec = write_vqa(tmp_path / "json", subtype="train2014", image_folder="../coco/train2014")
    dataset = load_vqa(spec, image_root=str(tmp_path / "coco"))  # COCO's layout: ROOT/train2014/COCO_train2014_...
    assert dataset[2]["key"] == str(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000007.jpg")
    assert dataset[2]["image"].getpixel((0, 0))[2] > 200  # blue


def test_subtype_from_the_file_name(tmp_path):
    spec = write_vqa(tmp_path, annotations=False)
    tree = json.loads((tmp_path / "questions.json").read_text())
    del tree["data_subtype"]
    named = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    named.write_text(json.dumps(tree))
    assert load_vqa(str(named))[0]["key"].endswith("COCO_val2014_000000000042.jpg")
    (tmp_path / "questions.json").write_text(json.dumps(tree))
    with pytest.raises(ValueError, match="data_subtype"):
        load_vqa(spec)


def test_without_annotations_items_have_no_answers(tmp_path):
    dataset = load_vqa(write_vqa(tmp_path, annotations=False), draft_size=16)
    assert len(dataset) == 4 and dataset.answers is None
    item = dataset[0]
    assert "answers" not in item and item["question_id"] == 420 and item["image"].size == (32, 24)


def test_unusable_rows_are_counted(tmp_path):
    spec = write_vqa(
        tmp_path,
        extra_questions=[
            {"image_id": 42, "question": "   ", "question_id": 1},  # empty question
            {"image_id": "42", "question": "Why?", "question_id": 2},  # image id not an integer
            {"image_id": 7, "question": "No annotation?", "question_id": 3},
            {"image_id": 7, "question": "Bad answers?", "question_id": 4},
            "not a question",
        ],
        extra_annotations=[{"question_id": 4, "answers": []}, {"answers": [{"answer": "x"}]}],
    )
    dataset = load_vqa(spec)
    assert len(dataset) == 4
    assert (dataset.skipped_rows.bad, dataset.skipped_rows.seen) == (7, 11)  # 5 questions, 2 annotations
    messages = " ".join(dataset.skipped_rows.examples)
    assert "empty caption" in messages and "integer 'image_id'" in messages


def test_unreadable_image_raises_bad_sample(tmp_path):
    dataset = load_vqa(write_vqa(tmp_path))
    (tmp_path / "COCO_val2014_000000000007.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "COCO_val2014_000001234567.jpg").unlink()
    with pytest.raises(BadSample, match="question 70 .*cannot decode image"):
        dataset[2]
    with pytest.raises(BadSample, match="missing file"):
        dataset[3]
    assert dataset[0]["question_id"] == 420


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no questions file at"):
        load_vqa(str(tmp_path / "missing.json"))
    spec = write_vqa(tmp_path)
    questions, annotations = spec.split("#")
    with pytest.raises(ValueError, match="no 'questions' list"):
        load_vqa(annotations)
    with pytest.raises(FileNotFoundError, match="no annotations file at"):
        load_vqa(questions + "#" + str(tmp_path / "none.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vqa(str(tmp_path / "broken.json"))
    (tmp_path / "empty.json").write_text(json.dumps({"data_subtype": "val2014", "questions": []}))
    with pytest.raises(ValueError, match="no usable questions"):
        load_vqa(str(tmp_path / "empty.json"))
