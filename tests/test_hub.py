"""crossmodal.hub against a loopback HTTP server of small files: a good download verified, cached and reused; a
connection dropped half way and its resume by a Range request; a server that ignores Range; wrong bytes; offline
with and without the file; the hub's published hashes (X-Linked-Etag behind a redirect, a small file's git blob
SHA-1); processes sharing the cache; `create_model(name, pretrained=TAG)` and `load_released` end to end; eval.py
offline. Hashes are computed here independently (hashlib, and git's blob format written out)."""
import hashlib
import http.server
import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from crossmodal import hub
from crossmodal.config import BadInput
from crossmodal.models import convert, create_model
from crossmodal.recipes import load_released
from tests.test_gpt_neox_tokenizer import tokenizer_json  # noqa: F401 (a fixture the next one takes)
from tests.test_open_flamingo import released  # noqa: F401 (a fixture: tiny OpenFlamingo-3B-style files)
from tests.test_train import ROOT

HOST = "https://weights.invalid"  # never reached: CROSSMODAL_HUB_MIRROR points every URL at the loopback server


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `state.files` (path -> bytes) as each path's `state.modes` says: good, cut (half the body, then the
    connection closes), stall (half, then waits), ignore_range (200 to a Range request), wrong (other bytes of the
    same length), redirect (302 to /cdn/PATH with the hub's hash headers, as huggingface.co answers LFS files)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body: bool):
        state = self.server.state
        state.requests.append((self.command, self.path, self.headers.get("Range")))
        mode = state.modes.get(self.path, "good")
        data = state.files.get(self.path.removeprefix("/cdn"))
        if data is None:
            return self.send_error(404)
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "/cdn" + self.path)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if mode == "wrong":
            data = bytes(255 - byte for byte in data)
        start, ranged = 0, self.headers.get("Range")
        if ranged and mode != "ignore_range":
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        for name, value in state.headers.get(self.path, {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not body:
            return
        payload = data[start:]
        if mode in ("cut", "stall"):
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            if mode == "stall":
                state.release.wait(10)
            return  # HTTP/1.0: the connection closes here, short of Content-Length
        for offset in range(0, len(payload), state.chunk):
            self.wfile.write(payload[offset:offset + state.chunk])
            time.sleep(state.delay)


class State:
    def __init__(self):
        self.files, self.modes, self.headers, self.requests = {}, {}, {}, []
        self.chunk, self.delay = 1 << 20, 0.0
        self.release = threading.Event()

    def gets(self, path: str) -> list:
        return [request for request in self.requests if request[0] == "GET" and request[1].endswith(path)]


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback server, with the cache in tmp_path and every URL mirrored to the server; short timeouts."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = State()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CROSSMODAL_HUB_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.delenv("CROSSMODAL_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "TIMEOUT", 2.0)
    yield httpd.state
    httpd.state.release.set()
    httpd.shutdown()
    httpd.server_close()


def serve(state: State, path: str, size: int = 300_000, seed: int = 0) -> tuple[str, bytes, str]:
    """(url, bytes, sha256) of a random file the server holds at `path`."""
    data = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy()
    state.files[path] = data.tobytes()
    return HOST + path, state.files[path], hashlib.sha256(state.files[path]).hexdigest()


def cache_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, file), root) for folder, _, files in os.walk(root)
                  for file in files if not file.endswith(".lock"))


def test_good_download_is_verified_cached_and_reused(server, tmp_path, capsys):
    url, data, sha256 = serve(server, "/w/good.bin")
    path = hub.download(url, sha256)
    err = capsys.readouterr().err
    assert err.startswith("good.bin: 100.0% of 0.3 MiB, ") and err.count("\n") == 1  # no terminal: one line
    assert path == os.path.join(tmp_path, "cache", "weights.invalid", "w", "good.bin")
    assert open(path, "rb").read() == data
    assert cache_files(tmp_path / "cache") == ["weights.invalid/w/good.bin", "weights.invalid/w/good.bin.sha256"]
    assert open(path + ".sha256").read().split() == [sha256, str(len(data))]
    before = len(server.requests)
    assert hub.download(url, sha256) == path and hub.download(url, sha256[:8]) == path  # open_clip's prefix too
    assert len(server.requests) == before  # reused without a request


def test_cut_download_fails_fast_keeps_the_partial_and_resumes_with_range(server, tmp_path):
    url, data, sha256 = serve(server, "/w/cut.bin")
    server.modes["/w/cut.bin"] = "cut"
    started = time.monotonic()
    with pytest.raises(hub.DownloadError, match="connection closed after 150000 of 300000 bytes") as error:
        hub.download(url, sha256)
    assert time.monotonic() - started < 5 and "\n" not in str(error.value) and url in str(error.value)
    final = tmp_path / "cache" / "weights.invalid" / "w" / "cut.bin"
    assert not final.exists() and os.path.getsize(f"{final}.partial") == 150_000
    server.modes["/w/cut.bin"] = "good"
    assert hub.download(url, sha256) == str(final) and final.read_bytes() == data
    assert server.gets("/w/cut.bin")[-1][2] == "bytes=150000-"  # resumed, not started over
    assert not os.path.exists(f"{final}.partial")


def test_stalled_server_ends_within_the_timeout(server, monkeypatch):
    url, _, sha256 = serve(server, "/w/stall.bin")
    server.modes["/w/stall.bin"] = "stall"
    monkeypatch.setattr(hub, "TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(hub.DownloadError, match="connection broke after 150000 of 300000 bytes.*next try resumes"):
        hub.download(url, sha256)
    assert time.monotonic() - started < 3


def test_server_that_ignores_range_starts_over(server, tmp_path):
    url, data, sha256 = serve(server, "/w/norange.bin")
    partial = tmp_path / "cache" / "weights.invalid" / "w" / "norange.bin.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # not the file's first bytes: appending the rest to it would fail the hash
    server.modes["/w/norange.bin"] = "ignore_range"
    path = hub.download(url, sha256)
    assert server.gets("/w/norange.bin")[-1][2] == "bytes=1000-" and open(path, "rb").read() == data


def test_wrong_bytes_are_removed_and_nothing_is_cached(server, tmp_path):
    url, _, sha256 = serve(server, "/w/wrong.bin")
    server.modes["/w/wrong.bin"] = "wrong"
    with pytest.raises(hub.DownloadError) as error:
        hub.download(url, sha256)
    message = str(error.value)
    assert "\n" not in message and url in message and sha256 in message and "removed, nothing was cached" in message
    assert cache_files(tmp_path / "cache") == []


def test_a_cache_that_cannot_be_written_is_named(server, tmp_path, monkeypatch):
    url, _, sha256 = serve(server, "/w/nowhere.bin")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path / "a_file"))
    with pytest.raises(hub.DownloadError, match=f"cannot write it to {tmp_path}/a_file/weights.invalid/w/nowhere.bin "
                                                f"\\(NotADirectoryError.*set CROSSMODAL_CACHE to another folder"):
        hub.download(url, sha256)


def test_offline(server, tmp_path, monkeypatch):
    url, data, sha256 = serve(server, "/w/offline.bin")
    monkeypatch.setenv("CROSSMODAL_OFFLINE", "1")
    path = os.path.join(tmp_path, "cache", "weights.invalid", "w", "offline.bin")
    with pytest.raises(hub.DownloadError) as error:
        hub.download(url, sha256)
    assert str(error.value) == f"CROSSMODAL_OFFLINE=1 and {url} is not in the cache: download it to {path}"
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data[:-1] + b"?")  # put there by hand, wrong: refused, naming both hashes
    with pytest.raises(hub.DownloadError, match=f"is not {url}: its hash is .*, the published one {sha256}"):
        hub.download(url, sha256)
    with open(path, "wb") as f:
        f.write(data)  # the right file by hand: hashed once, stamped, used
    assert hub.download(url, sha256) == path and os.path.isfile(path + ".sha256")
    assert server.requests == []


def test_hub_hashes_behind_a_redirect_and_of_small_files(server, tmp_path):
    _, data, sha256 = serve(server, "/org/repo/resolve/main/model.bin")
    server.modes["/org/repo/resolve/main/model.bin"] = "redirect"  # LFS: 302 to the CDN, X-Linked-Etag
    config = b'{"hidden_size": 8}\n'
    server.files["/org/repo/resolve/main/config.json"] = config
    git_blob = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    server.headers["/org/repo/resolve/main/config.json"] = {"ETag": f'"{git_blob}"'}
    entry = hub.Released(f"{HOST}/org/repo/resolve/main/", format="mpt", files=("model.bin", "config.json"))
    folder = hub.fetch(entry)
    assert open(os.path.join(folder, "model.bin"), "rb").read() == data
    assert open(os.path.join(folder, "model.bin.sha256")).read().split()[0] == sha256
    assert open(os.path.join(folder, "config.json.sha256")).read().split()[0] == git_blob
    server.headers["/org/repo/resolve/main/config.json"] = {"ETag": f'"{"0" * 40}"'}
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(hub.DownloadError, match=f"config.json: downloaded bytes have hash {git_blob}, expected 0+;"):
        hub.fetch(entry)
    server.headers["/org/repo/resolve/main/config.json"] = {}
    with pytest.raises(hub.DownloadError, match="publishes no SHA-256 or git hash"):
        hub.fetch(entry)


def test_processes_sharing_the_cache_download_once(server, tmp_path):
    url, data, sha256 = serve(server, "/w/shared.bin", size=400_000)
    server.chunk, server.delay = 40_000, 0.15  # 1.5 s: the processes overlap
    code = f"from crossmodal import hub; print(hub.download({url!r}, {sha256!r}, progress=False))"
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes) and len(paths) == 1
    assert open(paths.pop(), "rb").read() == data and len(server.gets("/w/shared.bin")) == 1


def clip_bpe() -> str:
    """The BPE vocabulary open_clip (the dev extra) ships, located without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip (the dev extra) ships the CLIP BPE vocabulary this test serves")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


def tiny_checkpoint(tmp_path) -> tuple[bytes, dict]:
    """A ViT-tiny's random weights in open_clip's layout, as the bytes of a torch.save file."""
    torch.manual_seed(0)
    model = create_model("ViT-tiny")
    path = tmp_path / "vit_tiny.pt"
    torch.save(convert.ours_to_openclip(model.state_dict()), path)
    return path.read_bytes(), model.state_dict()


def test_create_model_and_load_released_by_tag(server, tmp_path, monkeypatch):
    data, expected = tiny_checkpoint(tmp_path)
    server.files["/w/vit_tiny-test.pt"] = data
    with open(clip_bpe(), "rb") as f:  # CLIP's real vocabulary, so that the tokenizer is built from the download
        vocab = f.read()
    server.files["/bpe/vocab.txt.gz"] = vocab
    bpe = hub.Released(f"{HOST}/bpe/vocab.txt.gz", hashlib.sha256(vocab).hexdigest())
    entry = hub.Released(f"{HOST}/w/vit_tiny-test.pt", hashlib.sha256(data).hexdigest(), quick_gelu=True,
                         companions={"bpe": bpe})
    monkeypatch.setitem(hub.RELEASED, ("ViT-tiny", "test"), entry)
    model = create_model("ViT-tiny", pretrained="test")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())
    assert any(type(module).__name__ == "QuickGELU" for module in model.modules())  # the tag's activation
    assert server.gets("/bpe/vocab.txt.gz") == []  # create_model takes no BPE
    with pytest.raises(BadInput, match=r"'tset'.*nor a released tag of ViT-tiny \(closest: test\); its tags: test"):
        create_model("ViT-tiny", pretrained="tset")
    with pytest.raises(BadInput, match="closest: laion2b_e16.*its tags: openai, laion400m_e31"):
        create_model("ViT-B-32", pretrained="laion2b")
    cfg, loaded, tokenizer = load_released("ViT-tiny", "test")
    assert tokenizer.model_path == hub.cache_path(f"{HOST}/bpe/vocab.txt.gz") and cfg.model.name == "ViT-tiny"
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in expected.items())
    assert len(server.gets("/w/vit_tiny-test.pt")) == 1  # the second load used the cache


def test_flamingo_tag_brings_its_vision_and_lm(server, released, monkeypatch):  # noqa: F811
    """An OpenFlamingo-style entry: checkpoint.pt from the hub (LFS, behind a redirect), its CLIP file by SHA-256
    and its LM folder's files by the hub's hashes, all three passed to create_model by the one tag."""
    folder = released["folder"]
    files = {"/of/resolve/main/checkpoint.pt": folder / "checkpoint_wrappers.pt", "/clip/clip.pt": folder / "clip.pt",
             **{f"/mpt/resolve/main/{name}": folder / "mpt" / name
                for name in ("config.json", "pytorch_model.bin", "tokenizer.json")}}
    for path, source in files.items():
        server.files[path] = source.read_bytes()
        server.headers[path] = {"X-Linked-Etag": hashlib.sha256(server.files[path]).hexdigest()}
    server.modes["/of/resolve/main/checkpoint.pt"] = "redirect"
    entry = hub.Released(f"{HOST}/of/resolve/main/checkpoint.pt", format="open_flamingo", companions={
        "vision": hub.Released(f"{HOST}/clip/clip.pt", hashlib.sha256(server.files["/clip/clip.pt"]).hexdigest()),
        "lm": hub.Released(f"{HOST}/mpt/resolve/main/", format="mpt",
                           files=("config.json", "pytorch_model.bin", "tokenizer.json"))})
    monkeypatch.setitem(hub.RELEASED, ("Flamingo-tiny", "test"), entry)
    model = create_model("Flamingo-tiny", pretrained="test")
    expected = create_model("Flamingo-tiny", pretrained=str(files["/of/resolve/main/checkpoint.pt"]),
                            **released["paths"]).state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    gets = sorted(request[1] for request in server.requests if request[0] == "GET")
    assert gets == sorted([*files, "/cdn/of/resolve/main/checkpoint.pt"])  # each once (the LFS one redirected)


def test_eval_offline_with_a_tag_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "CROSSMODAL_CACHE": str(tmp_path / "cache"), "CROSSMODAL_OFFLINE": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", "ViT-B-32", "--pretrained",
                             "openai", "--task", "zeroshot", "--data", "shapes:val"], capture_output=True, text=True,
                            env=env, timeout=120)
    url = hub.RELEASED[("ViT-B-32", "openai")].url
    path = os.path.join(tmp_path, "cache", *url.removeprefix("https://").split("/"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"eval.py: CROSSMODAL_OFFLINE=1 and {url} is not in the cache: download it to {path}\n"


def test_table_agrees_with_open_clip_and_its_urls():
    """Every CLIP entry is open_clip v3.3.0's (URL or hf-hub repo, activation); OpenAI's hash is its URL's path
    segment and open_clip's release files' prefix their name's suffix; no tag could be read as a path."""
    pretrained = pytest.importorskip("open_clip.pretrained")  # the dev extra
    from crossmodal.models import BLIP_MODELS, FLAMINGO_MODELS, MODELS

    for (name, tag), entry in hub.RELEASED.items():
        assert name in {**MODELS, **BLIP_MODELS, **FLAMINGO_MODELS} and not hub._is_path(tag), (name, tag)
        if (name, tag) in hub.BLIP_RELEASED or (name, tag) in hub.FLAMINGO_RELEASED:
            assert entry.url.startswith(f"{hub.HF}/") and "/resolve/main/" in entry.url and not entry.sha256
            assert entry.format in ("hf_blip", "open_flamingo") and entry.url.endswith("/") == bool(entry.files)
            continue
        reference = pretrained.get_pretrained_cfg(name, tag)
        assert reference.get("quick_gelu", False) == entry.quick_gelu and entry.companions == {"bpe": hub.CLIP_BPE}
        assert entry.format == ("openai" if entry.url.startswith(hub.OPENAI) else "open_clip")
        if entry.url.startswith(hub.OPENAI):
            assert entry.url == reference["url"] and entry.url.split("/")[-2] == entry.sha256
            assert len(entry.sha256) == 64
        elif entry.url.startswith(hub.OPEN_CLIP):
            assert entry.url == reference["url"] and len(entry.sha256) == 8
            assert entry.url.rsplit("-", 1)[1].split(".")[0] == entry.sha256
        else:  # the hub publishes the hash
            repo = entry.url.removeprefix(f"{hub.HF}/").removesuffix("/resolve/main/open_clip_pytorch_model.bin")
            assert reference["hf_hub"] == repo + "/" and not reference["url"] and not entry.sha256
    with open(clip_bpe(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hub.CLIP_BPE.sha256


def test_finetune_from_a_tag(server, tmp_path, monkeypatch):
    """train.py --finetune.pretrained=TAG: the weights and their BPE come through the cache, and the run saves the
    preset and vocabulary it used, so eval.py reloads it without the tag."""
    import dataclasses

    from crossmodal import train
    from crossmodal.models import MODELS
    from crossmodal.recipes import load_run

    # ViT-tiny with CLIP's vocabulary and context, as released weights of it would have
    monkeypatch.setitem(MODELS, "ViT-tiny", dataclasses.replace(MODELS["ViT-tiny"], vocab_size=49408, context_length=77))
    data, expected = tiny_checkpoint(tmp_path)
    server.files["/w/vit_tiny-test.pt"] = data
    with open(clip_bpe(), "rb") as f:
        vocab = f.read()
    server.files["/bpe/vocab.txt.gz"] = vocab
    bpe = hub.Released(f"{HOST}/bpe/vocab.txt.gz", hashlib.sha256(vocab).hexdigest())
    entry = hub.Released(f"{HOST}/w/vit_tiny-test.pt", hashlib.sha256(data).hexdigest(), companions={"bpe": bpe})
    monkeypatch.setitem(hub.RELEASED, ("ViT-tiny", "test"), entry)
    run = tmp_path / "run"
    common = ["--config", os.path.join(ROOT, "configs/clip/finetune_shapes.yaml"), "--model.name=ViT-tiny",
              "--finetune.init=", "--data.workers=0", "--data.val=shapes:val:16", "--data.heldout=",
              "--train.batch_size=8", "--train.steps=2", "--train.warmup_steps=1", "--train.eval_every=0",
              "--finetune.wise_alphas=1", f"--out_dir={run}"]
    train.main([*common, "--finetune.strategy=linear", "--finetune.pretrained=test"])
    cfg, model, tokenizer = load_run(str(run / "checkpoint.pt"))
    assert cfg.data.tokenizer_path == hub.cache_path(f"{HOST}/bpe/vocab.txt.gz")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())  # linear: head only
    assert len(server.gets("/w/vit_tiny-test.pt")) == 1
    with pytest.raises(SystemExit, match="nor a released tag of ViT-tiny"):
        train.main([*common, "--finetune.strategy=linear", "--finetune.pretrained=tset", f"--out_dir={run}2"])


def test_finetune_from_a_quickgelu_tag_names_the_quickgelu_preset(server, monkeypatch):
    from crossmodal.config import load_config
    from crossmodal.recipes.finetune import resolve

    with open(clip_bpe(), "rb") as f:
        vocab = f.read()
    server.files["/bpe/vocab.txt.gz"] = vocab
    bpe = hub.Released(f"{HOST}/bpe/vocab.txt.gz", hashlib.sha256(vocab).hexdigest())
    entry = hub.Released(f"{HOST}/w/b32.pt", "0" * 64, quick_gelu=True, companions={"bpe": bpe})
    for name in ("ViT-B-32", "ViT-B-32-quickgelu"):
        monkeypatch.setitem(hub.RELEASED, (name, "test"), entry)
    cfg = resolve(load_config(None, ["--model.name=ViT-B-32", "--finetune.strategy=linear",
                                     "--finetune.pretrained=test"]))
    assert cfg.model.name == "ViT-B-32-quickgelu"  # what the saved config must say to load the weights again
    assert cfg.data.tokenizer_path == hub.cache_path(f"{HOST}/bpe/vocab.txt.gz")
    assert server.gets("/w/b32.pt") == []  # resolving a config fetches the vocabulary, not the weights
