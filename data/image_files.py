"""Image files on disk with their captions: the in-memory index behind the coco, csv and imagefolder specs.

A format module (data/coco.py, data/csv_pairs.py, data/imagefolder.py) reads its index file once and
hands this class the unique image paths and one (image, caption) pair per caption. Images are decoded
only when an item is asked for; index rows that could not be used are kept in `skipped_rows` (a
BadSampleCount over the rows read) for train.py to report at start-up.
"""
import os

from torch.utils.data import Dataset

from crossmodal.data.bad_samples import BadSampleCount, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def resolve(path: str, root: str) -> str:
    """An image path from an index file: absolute as given, relative to `root` otherwise."""
    return path if os.path.isabs(path) else os.path.join(root, path)


class ImageFiles(Dataset):
    """Items: dict(image=PIL RGB, caption, key=image path[, label]); one item per caption.

    image_paths: the unique images; image_of[i]: the image of caption i (so retrieval can group
    captions by image); row_numbers[i]: where caption i sits in the index file, for messages.
    """

    def __init__(
        self,
        source: str,
        image_paths: list[str],
        image_of: list[int],
        texts: list[str],
        labels: list[int] | None = None,
        row_numbers: list[int] | None = None,
        skipped_rows: BadSampleCount | None = None,
        draft_size: int = 0,
    ):
        if not texts:
            raise ValueError(f"{source}: no usable image-text pairs"
                             + (f" ({skipped_rows.describe('rows')})" if skipped_rows and skipped_rows.bad else ""))
        self.source, self.image_paths, self.image_of, self.texts = source, image_paths, image_of, texts
        self.labels, self.row_numbers, self.draft_size = labels, row_numbers, draft_size
        self.skipped_rows = skipped_rows or BadSampleCount(seen=len(texts))

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, index: int) -> str:
        path = self.image_paths[self.image_of[index]]
        return f"{self.source} line {self.row_numbers[index]} ({path})" if self.row_numbers else path

    def image(self, image_index: int, where: str | None = None):
        """Unique image `image_index`, decoded; raises BadSample."""
        path = self.image_paths[image_index]
        return open_image(path, where or path, self.draft_size)

    def __getitem__(self, index: int) -> dict:
        item = {
            "image": self.image(self.image_of[index], self.where(index)),
            "caption": self.texts[index],
            "key": self.image_paths[self.image_of[index]],
        }
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item
