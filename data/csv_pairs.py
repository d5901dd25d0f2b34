"""`csv:PATH`: one image-text pair per row of a CSV or TSV file with a header (open_clip's format).

Columns are named by `data.csv_image_key` (default `filepath`) and `data.csv_caption_key` (default
`caption`); the separator is `data.csv_separator` ("tab" or a typed "\\t" for a tab), or, when that
is "", a tab if the header has one and a comma otherwise. Relative image paths resolve against
`data.image_root`, or the CSV's folder when that is "". Rows with the wrong number of columns, an
empty image path, or an empty or non-UTF-8 caption are left out and counted in `skipped_rows` with
their line numbers. Rows naming the same image file share one image, so retrieval groups their captions.
"""
import csv
import os

from crossmodal.data.bad_samples import BadSample, BadSampleCount, clean_caption
from crossmodal.data.image_files import ImageFiles, resolve


def load_csv(
    path: str,
    image_key: str = "filepath",
    caption_key: str = "caption",
    separator: str = "",
    image_root: str = "",
    draft_size: int = 0,
) -> ImageFiles:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"csv: no file at '{path}'")
    separator = {"tab": "\t", "\\t": "\t"}.get(separator, separator)  # '\t' as typed on a command line
    if len(separator) > 1:
        raise ValueError(f"csv: data.csv_separator must be one character, 'tab' or '' (sniff); got {separator!r}")
    root = image_root or os.path.dirname(path)
    # surrogateescape: a caption with bytes that are not UTF-8 spoils its row, not the whole file
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        separator = separator or ("\t" if "\t" in f.readline() else ",")
        f.seek(0)
        reader = csv.reader(f, delimiter=separator)
        header = [name.strip() for name in next(reader, [])]
        for key, config_key in ((image_key, "data.csv_image_key"), (caption_key, "data.csv_caption_key")):
            if key not in header:
                raise ValueError(f"csv: '{path}' has no column '{key}' ({config_key}); its columns: "
                                 f"{', '.join(header) or 'none'} (separator {separator!r})")
        image_column, caption_column = header.index(image_key), header.index(caption_key)
        image_index, paths, image_of, texts, lines = {}, [], [], [], []
        skipped = BadSampleCount()
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader, None)
            except csv.Error as error:
                skipped.add(1, 1, [f"{path} line {line}: {error}"])
                continue
            if row is None:
                break
            if not row:
                continue  # a blank line
            skipped.add(0, 1)
            where = f"{path} line {line}"
            try:
                if len(row) != len(header):
                    raise BadSample(where, f"{len(row)} columns, the header has {len(header)}")
                image = row[image_column].strip()
                if not image:
                    raise BadSample(where, "empty image path")
                texts.append(clean_caption(row[caption_column], where))
            except BadSample as error:
                skipped.add(1, 0, [str(error)])
                continue
            image_of.append(image_index.setdefault(image, len(image_index)))
            if image_of[-1] == len(paths):
                paths.append(resolve(image, root))
            lines.append(line)
    if not skipped.seen:
        raise ValueError(f"csv: '{path}' has no rows below its header")
    return ImageFiles(path, paths, image_of, texts, row_numbers=lines, skipped_rows=skipped, draft_size=draft_size)
