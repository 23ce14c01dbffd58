"""What the command line checks before it runs anything, and how it words failures.

Every problem with an argument becomes one line naming the argument and what
is wrong with it (exit status 2), never a traceback: a path that does not
exist, a file where a model directory was expected, a ``config.json`` that is
not JSON or names no architecture, a directory without weights, an
architecture TransformerLens cannot convert, an ``--html`` path that cannot be
written. These checks are cheap (no model is loaded) and run before the first
check, so a typo fails in a second rather than after the zoo was checked.
"""

import contextlib
import json
import os
from typing import Iterator, Sequence

__all__ = ["WEIGHT_FILES", "check_model_dir", "check_writable", "one_line", "load_error", "quiet_hf"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files ``from_pretrained`` reads weights from (one of them must exist)."""


def one_line(exc: BaseException) -> str:
    """``"ExcType: first line of the message"`` (HF errors run over many lines)."""
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_model_dir(path: str, zoo_names: Sequence[str]) -> None:
    """Raise ``ValueError`` (one line) unless ``path`` looks like a loadable HF model directory.

    Args:
        path: the argument as given.
        zoo_names: valid zoo names, quoted when ``path`` is neither.
    """
    if not os.path.exists(path):
        looks_like_path = os.sep in path or path.startswith((".", "~"))
        if looks_like_path:
            raise ValueError(f"{path}: does not exist (give a directory written by model.save_pretrained(dir))")
        import difflib

        close = difflib.get_close_matches(path, list(zoo_names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{path!r} is neither a zoo model ({', '.join(zoo_names)}) nor an existing directory"
            f" (a HuggingFace model directory written by model.save_pretrained(dir)){hint}"
        )
    if not os.path.isdir(path):
        raise ValueError(f"{path}: is a file, not a model directory (give the directory save_pretrained wrote)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(
            f"{path}: is not a HuggingFace model directory (no config.json); pass a zoo name "
            f"({', '.join(zoo_names)}) or a directory written by model.save_pretrained(dir)"
        )
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config}: broken config.json, not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{config}: broken config.json, no 'model_type' (what save_pretrained writes names one)")
    import transformers

    if data["model_type"] not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{path}: unsupported architecture, model_type {data['model_type']!r} is unknown to transformers")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise ValueError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])}) next to config.json")


def load_error(path: str, exc: BaseException) -> str:
    """The one line for an exception raised while loading or converting ``path``."""
    if isinstance(exc, NotImplementedError):
        return f"{path}: unsupported architecture, TransformerLens cannot convert it ({one_line(exc)})"
    return f"{path}: could not be loaded ({one_line(exc)})"


def check_writable(path: str) -> None:
    """Raise ``ValueError`` (one line) unless a report can be written at ``path``.

    Creates the parent directories (as the report writer would) and opens the
    file for appending; a file that did not exist before is removed again.
    """
    if os.path.isdir(path):
        raise ValueError(f"--html {path}: is a directory; give a file name such as {os.path.join(path, 'report.html')}")
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ValueError(f"--html {path}: cannot be written ({exc.strerror or one_line(exc)})") from None
    if not existed:
        os.remove(path)


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """No transformers progress bars ("Loading weights") on stderr inside the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
