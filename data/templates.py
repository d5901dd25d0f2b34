"""Prompt templates and class names for zero-shot classification (Radford et al., 2021, section 3.1.4): the
class name goes into "{}", and the text embeddings of all templates are averaged per class.

The lists are data files in data/prompts/ (one entry per line, '#' starts a comment line), so a user's own
list is the same kind of file: `eval.py --templates my_templates.txt --classnames my_classes.txt`.
Built-in names: templates `imagenet` (CLIP's 80) and `shapes`; class names `imagenet` (the 1000 names OpenAI
curated for CLIP, in class-index order).
"""
import difflib
import os

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
BUILTIN_TEMPLATES = {"imagenet": "imagenet_templates.txt", "shapes": "shapes_templates.txt"}
BUILTIN_CLASSNAMES = {"imagenet": "imagenet_classnames.txt"}


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a text file, '#' comment lines skipped, surrounding whitespace stripped."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _load(name_or_path: str, builtin: dict[str, str], what: str) -> list[str]:
    if name_or_path in builtin:
        return read_lines(os.path.join(PROMPTS_DIR, builtin[name_or_path]))
    if not os.path.isfile(name_or_path):
        close = difflib.get_close_matches(name_or_path, builtin, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FileNotFoundError(
            f"{what} '{name_or_path}' is neither a built-in set ({', '.join(builtin)}) nor a file{hint}")
    lines = read_lines(name_or_path)
    if not lines:
        raise ValueError(f"{what} file '{name_or_path}' has no entries")
    return lines


def load_templates(name_or_path: str) -> list[str]:
    """A built-in template set or a file of templates; each must contain '{}' exactly once."""
    templates = _load(name_or_path, BUILTIN_TEMPLATES, "templates")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise ValueError(f"templates '{name_or_path}', entry {number} ({template!r}): needs exactly one '{{}}'")
    return templates


def load_classnames(name_or_path: str) -> list[str]:
    """A built-in class-name list or a file with one class name per line, in class-index order."""
    return _load(name_or_path, BUILTIN_CLASSNAMES, "classnames")


SHAPES_TEMPLATES = tuple(load_templates("shapes"))
OPENAI_IMAGENET_TEMPLATES = tuple(load_templates("imagenet"))
