"""`imagefolder:PATH`: one folder per class (torchvision's ImageFolder layout), for zero-shot classification.

Sorted folder names are the class indices; `classnames` are the folder names with underscores made
spaces (`golden_retriever` -> "golden retriever"), the text zero-shot prompts are built from. Images
are found recursively inside each class folder (files.walk: each real folder once, FIFOs, sockets and
broken links left out and listed in `skipped`). An item's caption is its class name.

A class folder without images is not a class (an empty class would still take a place in the classifier
and in the chance level): it is left out, listed in `empty_folders`, and the classes after it move up.
`folder_positions[c]` is class c's place among all the folders, to pick class c's name from a list of
names written for every folder (`--classnames`).
"""
import os

from crossmodal.data.image_files import IMAGE_EXTENSIONS, ImageFiles
from crossmodal.files import shown, walk


class ImageFolder(ImageFiles):
    def __init__(self, root: str, draft_size: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"imagefolder: no folder at '{shown(root)}'")
        files, self.skipped = walk(root, IMAGE_EXTENSIONS)
        all_folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        by_folder = {folder: [] for folder in all_folders}
        for path in files:
            folder, _, rest = os.path.relpath(path, os.path.abspath(root)).partition(os.sep)
            if rest and folder in by_folder:  # (files directly under root belong to no class)
                by_folder[folder].append(path)
        self.folders = [folder for folder in all_folders if by_folder[folder]]
        self.empty_folders = [folder for folder in all_folders if not by_folder[folder]]
        self.folder_positions = [all_folders.index(folder) for folder in self.folders]
        self.classnames = [folder.replace("_", " ") for folder in self.folders]
        if not self.folders:
            raise ValueError(f"imagefolder: no images under '{shown(root)}' (expected one folder of images per "
                             f"class; found {len(all_folders)} folders)")
        paths = [path for folder in self.folders for path in by_folder[folder]]
        labels = [label for label, folder in enumerate(self.folders) for _ in by_folder[folder]]
        texts = [self.classnames[label] for label in labels]
        super().__init__(root, paths, list(range(len(paths))), texts, labels=labels, draft_size=draft_size)

    def left_out(self) -> list[str]:
        """What the folder walk left out, one line each: empty class folders and skipped entries with the reason."""
        return ([f"{shown(os.path.join(self.source, folder))}: an empty class folder, not a class"
                 for folder in self.empty_folders] + [f"{shown(path)}: {reason}" for path, reason in self.skipped])
