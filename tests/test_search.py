"""search.py: the index finds what it must (a colour model whose text and image features agree by
construction), incremental updates embed only new files and keep old scores, unreadable files and
what the folder walk leaves out (FIFOs, loops, dangling links) are skipped and listed, a failed page leaves
the previous one, an index that is not intact is a BadInput, videos are sampled at the right times (through PyAV, or the ffmpeg
program where PyAV is missing), a folder of mp4 clips is indexed with no ffmpeg program on PATH, the command line
on a train.py checkpoint writes the JSON and HTML formats, and a real browser shows the thumbnails."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossmodal import search
from crossmodal import train
from crossmodal.config import BadInput
from crossmodal.data.transforms import image_transform
from tests.test_train import ROOT, small_run, tokenizer_path  # noqa: F401  (module-scoped fixture)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255)}
needs_decoder = pytest.mark.skipif(not search.video_decoder(), reason="neither PyAV nor ffmpeg and ffprobe are installed")


class ColourModel(torch.nn.Module):
    """Image feature: the mean preprocessed pixel (a direction per colour); text feature: the same vector
    for the colour the text names. So a text query must find the image of its colour."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1))
        self.images_encoded = 0

    def encode_image(self, images, normalize=True):
        self.images_encoded += len(images)
        return F.normalize(images.mean((2, 3)) * self.scale, dim=-1)  # (B, 3)

    def encode_text(self, tokens, normalize=True):
        return F.normalize(tokens, dim=-1)


def colour_tokenizer(texts):
    transform = image_transform(16, train=False)
    vectors = []
    for text in texts:
        name = next(name for name in COLOURS if name in text)
        vectors.append(transform(Image.new("RGB", (16, 16), COLOURS[name])).mean((1, 2)))
    return torch.stack(vectors)


def write_picture(path, colour, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return str(path)


def write_video(path, colours, seconds_each=2, fps=10):
    """Colour blocks of seconds_each seconds, one after another (64x48, written by PyAV or else by ffmpeg)."""
    if search.video_decoder() == "pyav":
        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for colour in colours:
                picture = np.zeros((48, 64, 3), np.uint8) + np.array(COLOURS[colour], np.uint8)
                for _ in range(seconds_each * fps):
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
            container.mux(stream.encode())
        return str(path)
    inputs = []
    for colour in colours:
        inputs += ["-f", "lavfi", "-i", f"color=c={colour}:s=64x48:d={seconds_each}:r={fps}"]
    joined = "".join(f"[{i}]" for i in range(len(colours))) + f"concat=n={len(colours)}:v=1[v]"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", *inputs, "-filter_complex", joined,
                    "-map", "[v]", "-pix_fmt", "yuv420p", str(path)], check=True)
    return str(path)


def build(model, folder, index, **kwargs):
    lines = []
    summary = search.build_index(model, 16, str(folder), str(index), {"checkpoint": "test"}, log=lines.append,
                                 batch_size=2, **kwargs)
    return summary, lines


def ask(model, index_path, k=3, **query):
    index = search.load_index(str(index_path))
    return search.search(index, search.query_vector(model, colour_tokenizer, 16, **query), k)


def test_text_and_image_queries_find_their_colour(tmp_path):
    for colour in ("red", "green", "blue", "yellow"):
        write_picture(tmp_path / "pictures" / "nested" / f"{colour}.png", colour)
    model, index = ColourModel(), tmp_path / "index.pt"
    summary, _ = build(model, tmp_path / "pictures", index)
    assert summary["rows"] == 4 and summary["skipped"] == {}
    for colour in ("red", "green", "blue", "yellow"):
        best = ask(model, index, text=f"a {colour} picture")[0]
        assert best["path"].endswith(f"nested/{colour}.png") and best["time"] is None
        assert best["score"] == pytest.approx(1.0, abs=2e-3)  # stored in float16
        example = str(tmp_path / "pictures" / "nested" / f"{colour}.png")
        assert ask(model, index, image=example)[0]["path"] == example
    # both: the weight decides which side wins
    green = str(tmp_path / "pictures" / "nested" / "green.png")
    assert ask(model, index, text="red", image=green, image_weight=0.9)[0]["path"] == green
    assert ask(model, index, text="red", image=green, image_weight=0.1)[0]["path"].endswith("red.png")
    results = ask(model, index, text="red", k=10)
    assert len(results) == 4 and [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_top_k_is_exact_over_many_chunks(monkeypatch):
    monkeypatch.setattr(search, "CHUNK_ROWS", 1000)
    features = F.normalize(torch.randn(5500, 32, generator=torch.Generator().manual_seed(0)), dim=-1).half()
    query = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0)
    scores, rows = search.top_k(features, query, 20)
    exact = features.float() @ query
    torch.testing.assert_close(scores, exact[rows])
    assert set(rows.tolist()) == set(exact.topk(20).indices.tolist())


def test_incremental_update_embeds_only_new_files_and_keeps_old_scores(tmp_path):
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    for colour in ("red", "green", "blue"):
        write_picture(folder / f"{colour}.png", colour)
    model = ColourModel()
    build(model, folder, index)
    before = {r["path"]: r["score"] for r in ask(model, index, text="magenta", k=10)}
    assert model.images_encoded == 3

    write_picture(folder / "more" / "magenta.png", "magenta")
    write_picture(folder / "more" / "cyan.png", "cyan")
    os.remove(folder / "green.png")
    summary, lines = build(model, folder, index)
    assert model.images_encoded == 5  # only the two new ones
    assert (summary["embedded_files"], summary["removed_files"], summary["unchanged_files"]) == (2, 1, 2)
    after = {r["path"]: r["score"] for r in ask(model, index, text="magenta", k=10)}
    assert set(after) == {str(folder / name) for name in ("red.png", "blue.png", "more/magenta.png", "more/cyan.png")}
    for path in (str(folder / "red.png"), str(folder / "blue.png")):
        assert after[path] == before[path]
    assert ask(model, index, text="magenta")[0]["path"] == str(folder / "more" / "magenta.png")

    write_picture(folder / "red.png", "white", size=(41, 30))  # changed: embedded again
    summary, _ = build(model, folder, index)
    assert model.images_encoded == 6 and summary["embedded_files"] == 1
    assert ask(model, index, text="white")[0]["path"] == str(folder / "red.png")
    summary, _ = build(model, folder, index)  # nothing changed: nothing embedded
    assert model.images_encoded == 6 and summary["rows"] == 4


def test_an_interrupted_index_keeps_what_it_saved(tmp_path, monkeypatch):
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    for i, colour in enumerate(("red", "green", "blue", "yellow", "magenta", "cyan")):
        write_picture(folder / f"{i}_{colour}.png", colour)
    monkeypatch.setattr(search, "SAVE_EVERY_ROWS", 2)

    class Crash(ColourModel):
        def encode_image(self, images, normalize=True):
            if self.images_encoded >= 4:
                raise KeyboardInterrupt
            return super().encode_image(images, normalize)

    with pytest.raises(KeyboardInterrupt):
        build(Crash(), folder, index)  # units of 2 images: saved after 2 and after 4, stopped at 5
    assert len(search.load_index(str(index))["paths"]) == 4
    model = ColourModel()
    summary, _ = build(model, folder, index)
    assert model.images_encoded == 2 and summary["rows"] == 6
    assert ask(model, index, text="cyan")[0]["path"].endswith("5_cyan.png")


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    red = write_picture(folder / "red.png", "red")
    (folder / "not_an_image.jpg").write_text("hello")
    (folder / "truncated.png").write_bytes(open(red, "rb").read()[:40])
    (folder / "empty.webp").write_bytes(b"")
    summary, lines = build(ColourModel(), folder, index)
    assert summary["rows"] == 1
    unreadable = ("not_an_image.jpg", "truncated.png", "empty.webp")
    assert set(summary["skipped"]) == {str(folder / name) for name in unreadable}
    assert all(any(path in line for line in lines) for path in summary["skipped"])
    assert search.load_index(str(index))["skipped"] == summary["skipped"]


def test_the_walk_sees_each_file_once_and_lists_what_it_leaves_out(tmp_path):
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    write_picture(folder / "red.png", "red")
    write_picture(folder / "sub" / "blue.png", "blue")
    os.symlink("..", folder / "sub" / "up")  # a loop: pictures/sub/up/sub/up/...
    os.mkfifo(folder / "pipe.png")
    os.symlink("nowhere.png", folder / "gone.png")
    summary, lines = build(ColourModel(), folder, index)
    assert summary["rows"] == 2
    assert summary["skipped"] == {str(folder / "pipe.png"): "a FIFO", str(folder / "gone.png"): "a dangling link",
                                  str(folder / "sub" / "up"): "a link to a folder already walked"}
    assert all(any(path in line for line in lines) for path in summary["skipped"])


def test_a_failed_page_keeps_the_previous_one(tmp_path, monkeypatch):
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    for colour in ("red", "green"):
        write_picture(folder / f"{colour}.png", colour)
    model = ColourModel()
    build(model, folder, index)
    report = {"query": "red", "text": "red", "image": None, "image_weight": None,
              "results": ask(model, index, text="red", k=2)}
    page = tmp_path / "results.html"
    page.write_text("the previous page")

    def broken(path, seconds):
        raise OSError("disk full")

    monkeypatch.setattr(search, "thumbnail", broken)
    with pytest.raises(OSError):
        search.write_html(report, str(page))
    assert page.read_text() == "the previous page"
    assert sorted(os.listdir(tmp_path)) == ["index.pt", "pictures", "results.html"]  # no temporary file left


def test_an_index_that_is_not_intact_raises_bad_input(tmp_path):
    folder, index = tmp_path / "pictures", tmp_path / "index.pt"
    write_picture(folder / "red.png", "red")
    build(ColourModel(), folder, index)
    stored = torch.load(index, weights_only=True)
    for what, content in {"no source": {**stored, "source": {"model": "ViT-tiny"}},
                          "a 1-D features": {**stored, "features": stored["features"][0]},
                          "missing files": {**stored, "file_sizes": stored["file_sizes"][:0]}}.items():
        torch.save(content, index)
        with pytest.raises(BadInput, match="is not a search index"):
            search.load_index(str(index))
    index.write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        search.load_index(str(index))


def test_videos_without_a_decoder_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "video_decoder", lambda: False)
    folder = tmp_path / "pictures"
    write_picture(folder / "red.png", "red")
    (folder / "holiday.mp4").write_bytes(b"\0" * 100)
    summary, _ = build(ColourModel(), folder, tmp_path / "index.pt")
    assert summary["rows"] == 1 and summary["skipped"] == {str(folder / "holiday.mp4"): search.NO_DECODER}


@needs_decoder
def test_video_frames_every_n_seconds_and_at_scene_changes(tmp_path):
    folder = tmp_path / "pictures"
    write_picture(folder / "red.png", "red")
    video = write_video(folder / "clip.mp4", ["magenta", "cyan", "white"])  # 2 s each
    (folder / "broken.mp4").write_bytes(b"not a video")
    model, index = ColourModel(), tmp_path / "index.pt"
    summary, _ = build(model, folder, index, every=1.0)
    assert summary["rows"] == 1 + 6 and list(summary["skipped"]) == [str(folder / "broken.mp4")]
    stored = search.load_index(str(index))
    assert [t for t in stored["times"].tolist() if t == t] == pytest.approx([0, 1, 2, 3, 4, 5], abs=0.01)
    results = ask(model, index, text="cyan", k=2)
    assert {(r["path"], r["time"]) for r in results} == {(video, 2.0), (video, 3.0)}

    summary, lines = build(model, folder, index, every=0.5, scene=0.3)  # new sampling: the video again
    assert model.images_encoded == 7 + 3 and any("sampling changed" in line for line in lines)
    assert sorted(t for t in search.load_index(str(index))["times"].tolist() if t == t) == pytest.approx([0, 2, 4],
                                                                                                        abs=0.01)
    assert search.thumbnail(video, 4.0) is not None  # a frame for the HTML page


def test_a_folder_of_mp4_clips_is_indexed_without_an_ffmpeg_program(tmp_path, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setenv("PATH", str(tmp_path / "no_programs"))  # no ffmpeg, no ffprobe
    assert shutil.which("ffmpeg") is None and search.video_decoder() == "pyav"
    folder = tmp_path / "clips"
    folder.mkdir()
    red_then_blue = write_video(folder / "red_then_blue.mp4", ["red", "blue"], seconds_each=1)
    green = write_video(folder / "green.mp4", ["green"], seconds_each=3)
    model, index = ColourModel(), tmp_path / "index.pt"
    summary, _ = build(model, folder, index, every=0.5)
    assert summary["rows"] == 4 + 6 and summary["skipped"] == {}
    stored = search.load_index(str(index))
    times = {path: [] for path in (red_then_blue, green)}
    for path, time in zip(stored["paths"], stored["times"].tolist()):
        times[path].append(time)
    assert times == {red_then_blue: pytest.approx([0, 0.5, 1, 1.5], abs=1e-3),
                     green: pytest.approx([0, 0.5, 1, 1.5, 2, 2.5], abs=1e-3)}
    assert {(r["path"], r["time"]) for r in ask(model, index, text="blue", k=2)} == {(red_then_blue, 1.0),
                                                                                    (red_then_blue, 1.5)}
    assert ask(model, index, text="green", k=1)[0]["path"] == green
    assert search.thumbnail(red_then_blue, 1.2) is not None


def test_scene_score_is_ffmpegs():
    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    assert search.scene_score(None, black, 0.0) == (0.0, 0.0)  # the first frame
    score, mafd = search.scene_score(black, white, 0.0)
    assert mafd == pytest.approx(255 * 100 / 256) and score == pytest.approx(255 / 256)
    # a steady change (mafd as large as the previous one) is no scene change: min(mafd, |mafd - previous|)
    assert search.scene_score(black, white, mafd)[0] == 0.0
    half = np.concatenate([white[:2], black[2:]])
    assert search.scene_score(black, half, 0.0)[0] == pytest.approx(0.5 * 255 / 256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):  # noqa: F811
    out = tmp_path_factory.mktemp("run")
    train.main(small_run(out, tokenizer_path, "--train.steps=2", "--data.val=shapes:val:16", "--data.heldout="))
    return str(out / "checkpoint.pt")


def write_shapes(folder, count):
    from crossmodal.data import build_dataset

    dataset = build_dataset(f"shapes:val:{count}", image_size=64)
    for i in range(count):
        path = folder / ("sub" if i % 2 else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset[i]["image"].save(path)


def test_command_line_on_a_checkpoint(tmp_path, checkpoint):
    folder, index = tmp_path / "pictures", str(tmp_path / "index.pt")
    write_shapes(folder, 6)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    summary = search.main(["index", "--checkpoint", checkpoint, "--images", str(folder), "--index", index])
    assert summary["rows"] == 6 and list(summary["skipped"]) == [str(folder / "corrupt.jpg")]

    out = tmp_path / "results.json"
    search.main(["query", "--index", index, "--text", "a red circle", "--k", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["query"] == "a red circle" and len(report["results"]) == 4
    for result in report["results"]:
        assert set(result) == {"path", "score", "time"} and os.path.isfile(result["path"]) and result["time"] is None
    scores = [result["score"] for result in report["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)

    out = tmp_path / "results.html"  # as a script, the way users run it
    subprocess.run([sys.executable, "search.py", "query", "--index", index, "--image", str(folder / "0.png"),
                    "--text", "a shape", "--image-weight", "0.8", "--k", "5", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    page = out.read_text()
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbnails) == 5
    for encoded in thumbnails:
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).format == "JPEG"
    assert str(folder / "0.png") in page and "a shape" in page

    with pytest.raises(SystemExit, match="no index at"):
        search.main(["query", "--index", str(tmp_path / "nowhere.pt"), "--text", "a red circle"])


def screenshot(page, png, size="900,560") -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--screenshot={png}", f"file://{page}"],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")),
                    reason="no chromium to open the page in")
def test_a_browser_shows_the_thumbnails(tmp_path):
    folder = tmp_path / "pictures"
    for colour in ("red", "green", "blue"):
        write_picture(folder / f"{colour}.png", colour, size=(120, 90))
    model, index = ColourModel(), tmp_path / "index.pt"
    build(model, folder, index)
    report = {"query": "red", "text": "red", "image": None, "image_weight": None,
              "results": ask(model, index, text="red", k=3)}
    search.write_html(report, str(tmp_path / "results.html"))
    png = tmp_path / "shot.png"
    screenshot(tmp_path / "results.html", png)
    pixels = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).reshape(-1, 3).int()  # (H * W, 3)
    for colour in ("red", "green", "blue"):  # each thumbnail shows up as a block of its colour
        close = (pixels - torch.tensor(COLOURS[colour])).abs().max(-1).values < 40
        assert close.sum() > 80 * 60, colour
