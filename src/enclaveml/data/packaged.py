"""Real sample images that ship inside pip packages, materialised as image folders (owner side).

foolbox 3.3.4 ships 20 ImageNet photos, 20 CIFAR-10 and 20 MNIST images under `foolbox/data/`
(label in the file name); scikit-image ships a handful of unlabelled photos. Copied once under
`paths.cache()/packaged/<name>/<label>/`, they can be passed as `--data` anywhere a folder is
expected: the ImageNet-level assessment, and the demo when ../shared is absent.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .. import paths
from ..errors import DataError

_FOOLBOX = {"foolbox-imagenet": "imagenet", "foolbox-cifar10": "cifar10", "foolbox-mnist": "mnist"}
_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
NAMES = (*_FOOLBOX, "skimage-photos")


def _foolbox_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("foolbox")  # locate, not import: foolbox pulls in its attack stack
    if spec is None or not spec.submodule_search_locations:
        raise DataError("packaged foolbox samples need `pip install foolbox==3.3.4` (or `pip install -e '.[samples]'`)")
    return Path(list(spec.submodule_search_locations)[0]).resolve() / "data"


def _write_foolbox(prefix: str, dest: Path) -> None:
    pat = re.compile(rf"^{re.escape(prefix)}_(\d+)_(\d+)\.(png|jpg|jpeg)$")
    found = 0
    for f in sorted(_foolbox_dir().iterdir()):
        m = pat.match(f.name)
        if m:
            (dest / m.group(2)).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / m.group(2) / f.name)
            found += 1
    if not found:
        raise DataError(f"foolbox ships no {prefix} samples in {_foolbox_dir()}")


def _write_skimage(dest: Path) -> None:
    try:
        import skimage.data
    except ImportError:
        raise DataError("packaged photos need `pip install scikit-image`") from None
    from PIL import Image

    (dest / "unlabelled").mkdir(parents=True, exist_ok=True)
    for name in _SKIMAGE:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # a data file that needs a download is skipped, not fatal
            continue
        Image.fromarray(arr[..., :3]).convert("RGB").save(dest / "unlabelled" / f"{name}.png")


def packaged_imagefolder(name: str) -> Path:
    """The folder of a packaged sample set (created on first use): 'foolbox-imagenet', 'foolbox-cifar10',
    'foolbox-mnist' (labels are class indices as folder names) or 'skimage-photos' (one unlabelled folder)."""
    if name not in NAMES:
        raise DataError(f"unknown packaged image set {name!r}; known: {', '.join(NAMES)}")
    dest = paths.cache() / "packaged" / name
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if name in _FOOLBOX:
            _write_foolbox(_FOOLBOX[name], tmp)
        else:
            _write_skimage(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
