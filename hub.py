"""Released weights by name: `create_model("ViT-B-32", pretrained="openai")` downloads, verifies and caches the
file its tag names in `RELEASED`, one explicit table of (model name, tag) -> URL, hash and format.

References: open_clip v3.3.0 `pretrained.py` (its tags, URLs and hf-hub repos; `download_pretrained_from_url`),
openai/CLIP `clip/clip.py` (`_MODELS`, `_download`), huggingface_hub `get_hf_file_metadata` (the hash headers).

Where the hashes come from (nothing here is typed in from memory):
- OpenAI's URLs carry the file's full SHA-256 as their second-to-last path segment.
- open_clip's GitHub release files end in the first 8 hex digits of their SHA-256, which open_clip checks too.
- HuggingFace hub files (LAION's open_clip weights, Salesforce's BLIP folders, OpenFlamingo) have no hash written
  here: `resolve/main/FILE` answers a HEAD with the hash the hub publishes for it, `X-Linked-Etag` (a git-LFS
  file's SHA-256) or, for a small file stored in git itself, `ETag` (its git blob SHA-1). That guards against a cut
  or damaged download, not against the hub itself serving other bytes.
- CLIP's BPE vocabulary: the SHA-256 of the copy open_clip v3.3.0 ships, at that release's tag.
salesforce/BLIP's own `.pth` files (storage.googleapis.com) publish no SHA-256 and are left out: their tags are
Salesforce's HuggingFace folders, which hold the same models in transformers' layout.

Downloads go to `$CROSSMODAL_CACHE` (default ~/.cache/crossmodal), at `HOST/PATH` of the URL, through
`NAME.partial`: an interrupted download is resumed with `Range: bytes=N-` (a server that answers 200 instead of 206
starts it over), the hash is checked on the whole file before `os.replace` gives it its final name, and a file
that fails it is removed. `CROSSMODAL_OFFLINE=1` uses the cache only; `CROSSMODAL_HUB_MIRROR=URL` replaces the
scheme and host of every URL (for mirrors and tests; the cache path stays the original URL's).

Deliberate differences from open_clip:
- A cached file is not hashed again on every load (a 1.7 GB file takes seconds): `NAME.sha256` records the hash it
  was verified against and its size; a file whose size differs, or one without a stamp (put there by hand), is
  hashed once more before it is used.
- Processes sharing a cache (torchrun's ranks) take an exclusive lock on `NAME.lock` around the download: one
  downloads, the others wait and then find the verified file.
- A tag sets the activation its weights were trained with: `("ViT-B-32", "openai")` builds QuickGELU (open_clip
  builds GELU and warns).
"""
import difflib
import fcntl
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from crossmodal.config import BadInput
from crossmodal.files import shown, write_atomic

TIMEOUT = 30.0  # seconds a socket may wait for the server: a stalled download ends, and is resumed on the next try
CHUNK = 1 << 20


class DownloadError(BadInput):
    """A download that failed (unreachable, cut, wrong bytes) or cannot be made (offline): one line naming the URL
    and what to do; entry points print it and exit with status 2."""


@dataclass(frozen=True)
class Released:
    url: str  # one file; a HuggingFace folder is its ".../resolve/main/" URL with `files`
    sha256: str = ""  # the whole SHA-256, or open_clip's 8-hex-digit prefix; "" verifies against the hub's header
    format: str = "open_clip"  # which loader reads it: openai | open_clip | hf_blip | open_flamingo | mpt | bpe
    files: tuple[str, ...] = ()  # a folder's files, each verified by the hub's hash
    quick_gelu: bool = False  # trained with QuickGELU (OpenAI's weights and some of open_clip's)
    companions: Mapping[str, "Released"] = field(default_factory=dict)  # loader keyword -> the file it takes


OPENAI = "https://openaipublic.azureedge.net/clip/models"
OPEN_CLIP = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
HF = "https://huggingface.co"
CLIP_BPE = Released(  # what `find_bpe` looks for; open_clip v3.3.0's copy (openai/CLIP ships the same bytes)
    "https://raw.githubusercontent.com/mlfoundations/open_clip/v3.3.0/src/open_clip/bpe_simple_vocab_16e6.txt.gz",
    "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a", format="bpe")


def _openai(sha256: str, file: str) -> Released:
    return Released(f"{OPENAI}/{sha256}/{file}", sha256, "openai", quick_gelu=True, companions={"bpe": CLIP_BPE})


def _open_clip(file: str, quick_gelu: bool = False) -> Released:
    prefix = file.rsplit("-", 1)[1].split(".")[0]  # vit_b_32-laion2b_e16-af8dbd0c.pth -> af8dbd0c
    return Released(f"{OPEN_CLIP}/{file}", prefix, quick_gelu=quick_gelu, companions={"bpe": CLIP_BPE})


def _laion(repo: str) -> Released:
    return Released(f"{HF}/{repo}/resolve/main/open_clip_pytorch_model.bin", companions={"bpe": CLIP_BPE})


def _blip(repo: str) -> Released:
    return Released(f"{HF}/Salesforce/{repo}/resolve/main/", format="hf_blip",
                    files=("config.json", "pytorch_model.bin", "vocab.txt"))


# fmt: off
CLIP_RELEASED = {  # open_clip v3.3.0 pretrained.py, for this codebase's CLIP presets
    ("RN50", "openai"):                       _openai("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    ("RN50", "yfcc15m"):                      _open_clip("rn50-quickgelu-yfcc15m-455df137.pt", quick_gelu=True),
    ("RN50", "cc12m"):                        _open_clip("rn50-quickgelu-cc12m-f000538c.pt", quick_gelu=True),
    ("RN101", "openai"):                      _openai("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    ("RN101", "yfcc15m"):                     _open_clip("rn101-quickgelu-yfcc15m-3e04b30e.pt", quick_gelu=True),
    ("RN50x4", "openai"):                     _openai("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    ("ViT-B-32", "openai"):                   _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    ("ViT-B-32", "laion400m_e31"):            _open_clip("vit_b_32-quickgelu-laion400m_e31-d867053b.pt", quick_gelu=True),
    ("ViT-B-32", "laion400m_e32"):            _open_clip("vit_b_32-quickgelu-laion400m_e32-46683a32.pt", quick_gelu=True),
    ("ViT-B-32", "laion2b_e16"):              _open_clip("vit_b_32-laion2b_e16-af8dbd0c.pth"),
    ("ViT-B-32", "laion2b_s34b_b79k"):        _laion("laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("ViT-B-32", "datacomp_xl_s13b_b90k"):    _laion("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    ("ViT-B-16", "openai"):                   _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    ("ViT-B-16", "laion400m_e31"):            _open_clip("vit_b_16-laion400m_e31-00efa78f.pt"),
    ("ViT-B-16", "laion400m_e32"):            _open_clip("vit_b_16-laion400m_e32-55e67d44.pt"),
    ("ViT-B-16", "laion2b_s34b_b88k"):        _laion("laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    ("ViT-B-16", "datacomp_xl_s13b_b90k"):    _laion("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    ("ViT-L-14", "openai"):                   _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    ("ViT-L-14", "laion400m_e31"):            _open_clip("vit_l_14-laion400m_e31-69988bb6.pt"),
    ("ViT-L-14", "laion400m_e32"):            _open_clip("vit_l_14-laion400m_e32-3d133497.pt"),
    ("ViT-L-14", "laion2b_s32b_b82k"):        _laion("laion/CLIP-ViT-L-14-laion2B-s32B-b82K"),  # trained with Inception's mean/std
    ("ViT-L-14", "datacomp_xl_s13b_b90k"):    _laion("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
}
BLIP_RELEASED = {  # Salesforce's HuggingFace folders (transformers' BLIP layout; models.create_blip reads them)
    ("BLIP-base", "coco_retrieval"):    _blip("blip-itm-base-coco"),
    ("BLIP-base", "flickr_retrieval"):  _blip("blip-itm-base-flickr"),
    ("BLIP-base", "coco_caption"):      _blip("blip-image-captioning-base"),
    ("BLIP-large", "coco_retrieval"):   _blip("blip-itm-large-coco"),
    ("BLIP-large", "flickr_retrieval"): _blip("blip-itm-large-flickr"),
    ("BLIP-large", "coco_caption"):     _blip("blip-image-captioning-large"),
}
FLAMINGO_RELEASED = {  # OpenFlamingo-3B: its trained parts, and the CLIP and MPT folder it was trained on
    ("OpenFlamingo-3B-vitl-mpt1b", "openflamingo"): Released(
        f"{HF}/openflamingo/OpenFlamingo-3B-vitl-mpt1b/resolve/main/checkpoint.pt", format="open_flamingo",
        companions={
            "vision": CLIP_RELEASED[("ViT-L-14", "openai")],
            "lm": Released(f"{HF}/anas-awadalla/mpt-1b-redpajama-200b/resolve/main/", format="mpt",
                           files=("config.json", "pytorch_model.bin", "tokenizer.json")),
        }),
}
# fmt: on
RELEASED: dict[tuple[str, str], Released] = {
    **CLIP_RELEASED,
    # a QuickGELU preset takes the tags of weights trained with QuickGELU
    **{(f"{name}-quickgelu", tag): entry for (name, tag), entry in CLIP_RELEASED.items() if entry.quick_gelu},
    **BLIP_RELEASED,
    **FLAMINGO_RELEASED,
}


# ---------------------------------------------------------------- tags


def tags(name: str) -> list[str]:
    """The tags `RELEASED` has for model `name`."""
    return [tag for model, tag in RELEASED if model == name]


def _is_path(pretrained) -> bool:
    """A path, not a tag: not a string, an existing file or folder, or a name with a folder or an extension (no tag
    has either), which the loaders then report as missing in their own words."""
    return (not isinstance(pretrained, str) or os.path.exists(pretrained) or os.sep in pretrained or "." in pretrained
            or pretrained.startswith("~"))


def released(name: str, pretrained) -> Optional[Released]:
    """The table entry `pretrained` names for model `name`, or None when it is a path."""
    if _is_path(pretrained):
        return None
    entry = RELEASED.get((name, pretrained))
    if entry is None:
        known = tags(name)
        if not known:
            raise BadInput(f"pretrained '{pretrained}': no file or folder of that name, and {name} has no released "
                           f"weights to name by tag (crossmodal.hub.RELEASED)")
        closest = difflib.get_close_matches(pretrained, known, n=1, cutoff=0)
        raise BadInput(f"pretrained '{pretrained}': no file or folder of that name, nor a released tag of {name} "
                       f"(closest: {closest[0]}); its tags: {', '.join(known)}")
    return entry


def resolve_pretrained(name: str, pretrained: Union[str, os.PathLike]) -> Union[str, os.PathLike]:
    """A local path for `pretrained`: a path is returned unchanged; a tag of `name` in `RELEASED` is downloaded (or
    found in the cache) and its file's or folder's path returned; another name is a one-line error listing the
    model's tags and the closest one."""
    entry = released(name, pretrained)
    return pretrained if entry is None else fetch(entry)


def resolve_companions(name: str, pretrained, keys) -> dict[str, str]:
    """Local paths of the companion files (loader keyword -> path, for the `keys` asked) of the tag `pretrained`:
    CLIP's BPE vocabulary, OpenFlamingo's CLIP and language model. Empty for a path."""
    entry = released(name, pretrained)
    if entry is None:
        return {}
    return {key: fetch(companion) for key, companion in entry.companions.items() if key in keys}


def fetch(entry: Released) -> str:
    """The local path of an entry: its file, or its folder once every file of it is there."""
    if not entry.files:
        return download(entry.url, entry.sha256)
    folder = cache_path(entry.url)
    for file in entry.files:
        download(entry.url + file, "", os.path.join(folder, file))
    return folder


# ---------------------------------------------------------------- the cache


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("CROSSMODAL_CACHE") or os.path.join("~", ".cache", "crossmodal"))


def offline() -> bool:
    return os.environ.get("CROSSMODAL_OFFLINE", "").lower() in ("1", "true", "yes")


def cache_path(url: str) -> str:
    """Where `url` is cached: CACHE/HOST/PATH (a folder URL ending in / is that folder)."""
    parts = urllib.parse.urlsplit(url)
    segments = [segment for segment in urllib.parse.unquote(parts.path).split("/") if segment]
    if not parts.hostname or any(segment in (".", "..") for segment in segments):
        raise BadInput(f"cannot cache '{url}': it needs a host and a path without . or .. segments")
    return os.path.join(cache_root(), parts.hostname, *segments)


def mirrored(url: str) -> str:
    """`url` with its scheme and host replaced by $CROSSMODAL_HUB_MIRROR (which may carry a path prefix)."""
    mirror = os.environ.get("CROSSMODAL_HUB_MIRROR")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def _file_hash(path: str, expected: str) -> str:
    """The hash of a file in the kind `expected` is: a git blob SHA-1 for 40 hex digits, else SHA-256."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode()) if len(expected) == 40 else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(actual: str, expected: str) -> bool:
    return bool(expected) and actual.startswith(expected.lower())  # open_clip's URLs give a prefix


def _read_stamp(path: str) -> Optional[tuple[str, int]]:
    try:
        digest, size = open(path + ".sha256").read().split()
        return digest, int(size)
    except (OSError, ValueError):
        return None


def _cached(path: str, url: str, expected: str) -> bool:
    """Whether the final file at `path` can be used: its stamp's size holds, or it is hashed now against `expected`
    (a stamp is then written). A file that fails is removed online (it is downloaded again) and refused offline."""
    if not os.path.isfile(path):
        return False
    stamp = _read_stamp(path)
    if stamp is not None and stamp[1] == os.path.getsize(path) and (not expected or _matches(stamp[0], expected)):
        return True
    if not expected:
        if offline():  # nothing to check it against without the hub: taken as it is
            return True
        expected = _hub_hash(url)
    actual = _file_hash(path, expected)
    if _matches(actual, expected):
        write_atomic(path + ".sha256", f"{actual} {os.path.getsize(path)}\n")
        return True
    if offline():
        raise DownloadError(f"{shown(path)} is not {url}: its hash is {actual}, the published one {expected}; "
                            f"delete it, or put the right file there")
    os.remove(path)
    return False


# ---------------------------------------------------------------- downloading


def _hub_hash(url: str, timeout: Optional[float] = None) -> str:
    """The hash HuggingFace's hub publishes for a `resolve/` URL: a HEAD without following the redirect, whose
    `X-Linked-Etag` is a git-LFS file's SHA-256, else its `ETag`, a small file's git blob SHA-1."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # the 3xx comes back as an HTTPError whose headers we read

    request = urllib.request.Request(mirrored(url), method="HEAD", headers={"Accept-Encoding": "identity"})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout or TIMEOUT) as response:
            headers = response.headers
    except urllib.error.HTTPError as error:
        if error.code not in (301, 302, 303, 307, 308):
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason} (asking for its published hash)") from None
        headers = error.headers
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"{url}: cannot reach it to read its published hash ({_reason(error)})") from None
    value = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"').lower()
    if len(value) not in (40, 64) or any(c not in "0123456789abcdef" for c in value):
        raise DownloadError(f"{url}: the server publishes no SHA-256 or git hash for it (X-Linked-Etag/ETag: "
                            f"'{value}'), so it cannot be verified")
    return value


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def download(url: str, sha256: str = "", path: Optional[str] = None, timeout: Optional[float] = None,
             progress: bool = True) -> str:
    """The verified local copy of `url` (at `path`, default `cache_path(url)`), downloaded if not cached.

    sha256: the file's SHA-256 (or a prefix of it); "" takes the hash the HuggingFace hub publishes for the URL.
    A cut download keeps `path.partial` and raises; the next call resumes it. A wrong hash removes the partial file
    and raises. Offline ($CROSSMODAL_OFFLINE=1), a file not in the cache raises naming the URL and `path`."""
    path = path or cache_path(url)
    if _cached(path, url, sha256.lower()):
        return path
    if offline():
        raise DownloadError(f"CROSSMODAL_OFFLINE=1 and {url} is not in the cache: download it to {shown(path)}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process downloads; the others wait here, then find the file
            if _cached(path, url, sha256.lower()):
                return path
            expected = sha256.lower() or _hub_hash(url, timeout)
            _fetch(url, path + ".partial", timeout or TIMEOUT, progress)
            actual = _file_hash(path + ".partial", expected)
            if not _matches(actual, expected):
                os.remove(path + ".partial")
                raise DownloadError(f"{url}: downloaded bytes have hash {actual}, expected {expected}; removed, "
                                    f"nothing was cached")
            os.replace(path + ".partial", path)
            write_atomic(path + ".sha256", f"{actual} {os.path.getsize(path)}\n")
    except OSError as error:  # not the network's (those are DownloadErrors): the cache's folder or disk
        raise DownloadError(f"{url}: cannot write it to {shown(path)} ({_reason(error)}); free space there or set "
                            f"CROSSMODAL_CACHE to another folder") from None
    return path


def _fetch(url: str, partial: str, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `partial`: a Range request from its size, or from zero when the server answers
    200 (it ignored the range) or 416 (the partial file is not a prefix it knows)."""
    done = os.path.getsize(partial) if os.path.isfile(partial) else 0
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={done}-"} if done else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(mirrored(url), headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:
            os.remove(partial)
            return _fetch(url, partial, timeout, progress)
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"{url}: cannot reach it ({_reason(error)})") from None
    with response:
        start = 0
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")  # bytes START-END/TOTAL
            try:
                start = int(content_range.removeprefix("bytes ").split("-")[0])
            except ValueError:
                start = -1
            if start != done:
                raise DownloadError(f"{url}: asked for bytes from {done}, the server sent '{content_range}'")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        received = start
        started = shown_at = time.monotonic()
        try:
            with open(partial, "ab" if start else "wb") as f:
                while True:
                    try:
                        chunk = response.read1(CHUNK)  # what has arrived: a stall loses none of it
                    except (OSError, http.client.HTTPException) as error:
                        raise DownloadError(f"{url}: the connection broke after {received} of {total or '?'} bytes "
                                            f"({_reason(error)}); the next try resumes {shown(partial)}") from None
                    if not chunk:
                        break
                    f.write(chunk)  # a full disk raises OSError: download() names the cache
                    received += len(chunk)
                    if progress and time.monotonic() - shown_at > (0.2 if sys.stderr.isatty() else 30):
                        shown_at = time.monotonic()
                        _show(url, received, total, started)
        finally:
            if progress:  # the last state, ending the line: an error message starts on a fresh one
                _show(url, received, total, started, end=True)
    if total is not None and received != total:
        raise DownloadError(f"{url}: the connection closed after {received} of {total} bytes; the next try resumes "
                            f"{shown(partial)}")


def _show(url: str, received: int, total: Optional[int], started: float, end: bool = False) -> None:
    """One progress line on stderr, redrawn in place on a terminal."""
    rate = received / max(time.monotonic() - started, 1e-6) / 2**20
    share = f"{100 * received / total:5.1f}% of {total / 2**20:.1f} MiB" if total else f"{received / 2**20:.1f} MiB"
    line = f"{os.path.basename(urllib.parse.urlsplit(url).path)}: {share}, {rate:.1f} MiB/s"
    tty = sys.stderr.isatty()
    print(("\r" if tty else "") + line, end="\n" if end or not tty else "", file=sys.stderr, flush=True)
