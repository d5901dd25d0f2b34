"""`imagefolder:PATH`: one folder per class (torchvision's ImageFolder layout), for zero-shot classification.

Sorted folder names are the class indices; `classnames` are the folder names with underscores made
spaces (`golden_retriever` -> "golden retriever"), the text zero-shot prompts are built from. Images
are found recursively inside each class folder. An item's caption is its class name. A class folder
without images keeps its index (so indices match the folder list) but no items.
"""
import os

from crossmodal.data.image_files import IMAGE_EXTENSIONS, ImageFiles


class ImageFolder(ImageFiles):
    def __init__(self, root: str, draft_size: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"imagefolder: no folder at '{root}'")
        self.folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.classnames = [folder.replace("_", " ") for folder in self.folders]
        paths, labels = [], []
        for label, folder in enumerate(self.folders):
            for directory, subdirectories, files in os.walk(os.path.join(root, folder), followlinks=True):
                subdirectories.sort()  # os.walk visits them in this order
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(directory, name))
                        labels.append(label)
        if not paths:
            raise ValueError(f"imagefolder: no images under '{root}' (expected one folder of images per class; "
                             f"found {len(self.folders)} folders)")
        texts = [self.classnames[label] for label in labels]
        super().__init__(root, paths, list(range(len(paths))), texts, labels=labels, draft_size=draft_size)
