"""Serving a release's images without serving its folder.

The page shows a few files of a release: its example images, the atlas
thumbnails of a neuron's top images, the card's figures. Gradio serves a file
at ``/gradio_api/file=<path>`` when the path lies in its upload folder or in
``launch(allowed_paths=...)``. Listing the release folder there would serve
*everything* in it, by relative or absolute path: the SAE and Diff-C weights
(``model.safetensors``), ``release.json`` and the configs. That is harmless for
the bundled public release and a leak for a private local ``--release``
(issue 22).

So the app never lets Gradio serve a release folder. Each shown file is copied
into Gradio's upload folder when it is first shown (:func:`shown_copy`, by
content hash, so once per file and run), and the release folders are passed as
``blocked_paths`` (:func:`blocked_release_dirs`), which Gradio checks before
anything else: even a later ``allowed_paths`` or a release folder inside the
temp folder cannot expose them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

from gradio.processing_utils import save_file_to_cache
from gradio.utils import get_upload_folder

if TYPE_CHECKING:
    from revelio_hub.app.state import AppState


def shown_copy(path: Union[str, os.PathLike]) -> str:
    """The path of a copy of ``path`` in Gradio's upload folder (made on first use; content-addressed).

    Gradio's own ``save_file_to_cache``: a copy that exists is reused and
    touched, so the age-based cleanup of the temp folder does not delete it
    right after it was handed out again.
    """
    return save_file_to_cache(Path(path), cache_dir=get_upload_folder())


def shown_examples(examples: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A release's ``(example path, caption)`` pairs with each path replaced by its :func:`shown_copy`."""
    return [(shown_copy(path), caption) for path, caption in examples]


def blocked_release_dirs(state: "AppState") -> list[str]:
    """The local folders of ``state``'s releases, for ``launch(blocked_paths=...)``: none of their files is served."""
    return [str(rel.local_dir) for rel in state.releases.values() if rel.local_dir is not None]


__all__ = ["blocked_release_dirs", "shown_copy", "shown_examples"]
