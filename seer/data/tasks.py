"""Small labeled real-image tasks built from images the dependencies ship, and the one registry of those images.

Nothing is downloaded. Each task places a real object (a handwritten digit from scikit-learn, a glyph of a real font)
at a random position and scale on a canvas (a dark plain one, or a patch of one of scikit-learn's sample photos), so
raw pixels are a fair baseline rather than a trivial one, or cuts patches of real photos, and returns PIL images with
their labels. ``write_task(name, root)`` writes ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``
(ImageFolder layout), which ``seer pretrain data.source=images`` and ``seer.extract_features`` read directly.

    digits   scikit-learn's 1797 handwritten digits (8x8, 17 gray levels), 10 classes; train and test split the
             writers' digits, never the same digit image in both
    glyphs   the letters A-J rendered in the DejaVu fonts matplotlib ships (sans, serif, mono; regular, bold,
             oblique), 10 classes; test uses fonts never seen in train
    digits_on_photos  the digits over patches of scikit-learn's sample photos (china.jpg, flower.jpg), in white or
             black, whichever contrasts
    printed_digits  the digits 0-9 rendered in matplotlib's DejaVu, STIX and Computer Modern fonts (serif, sans,
             typewriter, italic, bold); test uses fonts never seen in train
    textures  patches (24-128 px, any quarter-turn, random gain and contrast) of ten of scikit-image's bundled photos
             of surfaces (brick, grass, gravel, coins, moon, Hubble deep field, immunohistochemistry, text, page,
             cells), in gray: which surface is it? Train patches come from the left 60% of each photo, test patches
             from the right 40%. Needs scikit-image.

The shipped images are few (a few dozen photos in scikit-learn, scikit-image and matplotlib), and several pieces of
work need them: recipe tuning, tasks the recipe never saw, copy-detection originals, a curation pool and its test
set. ``SHIPPED_IMAGES`` says once which file (or which columns of it) serves which purpose (``PURPOSES``), with the
sha256 of each file so that a package update that changes one is noticed. Tasks read their files only through it
(``shipped_image(id, purpose)``, ``shipped_images(purpose)``): a task that asks for an image outside its purpose
fails. The rule (``SCENE_SHARING``): no pixel ever serves two purposes; one scene may be cut into disjoint column
ranges only between ``untuned``, ``curation_pool`` and ``curation_test``; ``tuning`` and ``copy_originals`` own whole
scenes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "KINDS",
    "PURPOSES",
    "SCENE_SHARING",
    "SHIPPED_IMAGES",
    "TASKS",
    "TASK_PURPOSES",
    "UNREGISTERED",
    "ShippedImage",
    "make_task",
    "shipped_image",
    "shipped_images",
    "shipped_path",
    "write_task",
]

# ---------------------------------------------------------------------------------------------------------------------
# The registry of shipped images

PURPOSES: dict[str, str] = {
    "tuning": "the tasks the CPU recipe was or may be tuned on: every task of TASKS as it is",
    "untuned": "reserved for the real-photo tasks built after the recipe is frozen (issue 32 item 5), never tuned on",
    "copy_originals": "the originals of the copy-detection benchmark (issue 33), cut into non-overlapping regions",
    "curation_pool": "the uncurated pool of the curation experiment (issue 34)",
    "curation_test": "the curation experiment's balanced test set, which the pool holds only as planted copies",
}

# The pairs of purposes that may take disjoint column ranges of one scene. No pixel ever serves two purposes; every
# other pair never shares a scene: the recipe may have been tuned on any pixel of a tuning scene (its other half is
# not unseen), and the copy benchmark's originals must be scenes that no trunk trained on and no test set holds.
# untuned tasks and curation share scenes only because there are too few shipped photos for both (docs/data.md):
# neither tunes the recipe, and each trains and measures on its own columns only.
SCENE_SHARING: frozenset[frozenset[str]] = frozenset(
    frozenset(pair) for pair in (("untuned", "curation_pool"), ("untuned", "curation_test"),
                                 ("curation_pool", "curation_test"))
)  # fmt: skip

# kind -> what it is; the first two are real photos (camera, microscope, telescope or fundus camera), the only kinds
# an untuned task may use
KINDS: dict[str, str] = {
    "photo": "a photograph",
    "photo_stack": "an array of small photo crops (whole file only)",
    "scan": "a scanned printed page",
    "phase_image": "a quantitative phase image of a cell, from a digital hologram",
    "mri": "a magnetic resonance image, uint16",
    "elevation": "a measured terrain elevation map (a 2-D array of heights)",
    "digits_table": "scikit-learn's digits: one row per 8x8 digit, its 64 pixels (0-16) then its label (whole only)",
    "font": "a font file: glyphs, not an image (whole file only, read by path)",
}
_PIP = {"sklearn": "scikit-learn", "skimage": "scikit-image", "matplotlib": "matplotlib"}


@dataclass(frozen=True)
class ShippedImage:
    """One file a dependency ships and the purpose each of its regions serves.

    ``regions``: ``(purpose, x0, x1)``, columns ``[int(x0 * width), int(x1 * width))`` of the image at full height
    (``(purpose, 0.0, 1.0)``: the whole file). ``scene``: what it shows, shared by the files of one scene (a stereo
    pair); two purposes that must stay apart never share a scene. ``tasks``: the tasks of ``TASKS`` that read it.
    """

    id: str
    package: str  # the import name: sklearn, skimage, matplotlib
    path: str  # relative to the package's directory
    sha256: str  # of the file's bytes
    kind: str
    regions: tuple[tuple[str, float, float], ...]
    scene: str
    shows: str
    tasks: tuple[str, ...] = ()
    member: str = ""  # the array of an .npz file

    @property
    def purposes(self) -> tuple[str, ...]:
        return tuple(r[0] for r in self.regions)

    def span(self, purpose: str) -> tuple[float, float] | None:
        """The column range (fractions of the width) that serves ``purpose``, or None."""
        return next(((x0, x1) for p, x0, x1 in self.regions if p == purpose), None)


_TUNING = (("tuning", 0.0, 1.0),)
_COPY = (("copy_originals", 0.0, 1.0),)
_UNTUNED = (("untuned", 0.0, 1.0),)
# a photo shared by the untuned tasks and curation: the left 60% is untuned (the task splits it into its train and
# test columns, as textures does), the rest curation: 60-85% the pool, 85-100% its test set
_SHARED = (("untuned", 0.0, 0.6), ("curation_pool", 0.6, 0.85), ("curation_test", 0.85, 1.0))
_CURATION = (("curation_pool", 0.0, 0.75), ("curation_test", 0.75, 1.0))
_DIGIT_TASKS = ("digits", "digits_on_photos")
_GLYPH_TASKS = ("glyphs", "printed_digits")


def _image(package: str, path: str, sha256: str, kind: str, regions: tuple[tuple[str, float, float], ...],
           shows: str, tasks: tuple[str, ...] = (), scene: str = "", member: str = "") -> ShippedImage:  # fmt: skip
    image_id = f"{package}:{Path(path).name.split('.')[0]}"
    return ShippedImage(image_id, package, path, sha256, kind, tuple(regions), scene or image_id, shows, tasks, member)


def _font(name: str, sha256: str, tasks: tuple[str, ...]) -> ShippedImage:
    return _image("matplotlib", f"mpl-data/fonts/ttf/{name}.ttf", sha256, "font", _TUNING, f"the {name} font", tasks)


_SK, _SKI, _MPL = "sklearn", "skimage", "matplotlib"
_ENTRIES = (
    # tuning: what the tasks of TASKS read today, whole
    _image(_SK, "datasets/data/digits.csv.gz", "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
           "digits_table", _TUNING, "1797 handwritten digits of 43 writers", _DIGIT_TASKS),
    _image(_SK, "datasets/images/china.jpg", "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
           "photo", _TUNING, "a Chinese pagoda over a lake", ("digits_on_photos",)),
    _image(_SK, "datasets/images/flower.jpg", "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
           "photo", _TUNING, "an orange dahlia", ("digits_on_photos",)),
    _image(_SKI, "data/brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
           "photo", _TUNING, "a brick wall", ("textures",)),
    _image(_SKI, "data/grass.png", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
           "photo", _TUNING, "grass", ("textures",)),
    _image(_SKI, "data/gravel.png", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
           "photo", _TUNING, "gravel", ("textures",)),
    _image(_SKI, "data/coins.png", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
           "photo", _TUNING, "Greek coins", ("textures",)),
    _image(_SKI, "data/moon.png", "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
           "photo", _TUNING, "the moon's surface", ("textures",)),
    _image(_SKI, "data/hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
           "photo", _TUNING, "the Hubble deep field (telescope)", ("textures",)),
    _image(_SKI, "data/ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
           "photo", _TUNING, "immunohistochemistry of colonic tissue (microscope)", ("textures",)),
    _image(_SKI, "data/text.png", "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
           "photo", _TUNING, "handwritten text on paper", ("textures",)),
    _image(_SKI, "data/page.png", "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
           "scan", _TUNING, "a printed page", ("textures",)),
    _image(_SKI, "data/cell.png", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515",
           "phase_image", _TUNING, "a cell floating in saline", ("textures",)),
    _font("DejaVuSans", "3fdf69cabf06049ea70a00b5919340e2ce1e6d02b0cc3c4b44fb6801bd1e0d22", _GLYPH_TASKS),
    _font("DejaVuSans-Bold", "b184b89e3c1075f22f6b71575b6fc20d4972b3cfd3b23322ca6fd596dcaef167", _GLYPH_TASKS),
    _font("DejaVuSans-Oblique", "ccdf74b350f11fd3dd5774de50e5e6346a1a5da1f5b7d5fb83590665e97a5213", _GLYPH_TASKS),
    _font("DejaVuSans-BoldOblique", "6edf0283160186af451cbee71e7b845f2e4cabf264bb992ce668c83c25465e6f", _GLYPH_TASKS),
    _font("DejaVuSansMono", "602ec86b8948cfcd956482fe64f94c36c867770149ef2f791d4613f443bcecb3", _GLYPH_TASKS),
    _font("DejaVuSansMono-Bold", "baada9a5172fe20886251aff0433fc38461912d5daf07287e7bee56620a8da96", _GLYPH_TASKS),
    _font("DejaVuSansMono-Oblique", "28052813f7a709fc89f52d192dc995ef4f0fdc5c3d7b73a49d6849b1916d0cd0",
          _GLYPH_TASKS),
    _font("DejaVuSansMono-BoldOblique", "a69081c15c76c827e0a27a5a7f5c74b6135c843499955495ffa8c20d3a98288b",
          _GLYPH_TASKS),
    _font("DejaVuSerif", "107244956e9962b9e96faccdc551825e0ae0898ae13737133e1b921a2fd35ffa", _GLYPH_TASKS),
    _font("DejaVuSerif-Bold", "c3753f2ed6bc673f15846dc45addbeb3b9c872f32fb18fd53a21f1bef1ed7676", _GLYPH_TASKS),
    _font("DejaVuSerif-Italic", "3e7994fbc54fa10ce3352a42d548fadd7d9cadb69cb1109bc9d960f6dac57f04", _GLYPH_TASKS),
    _font("DejaVuSerif-BoldItalic", "d93efec7a9d2e826768d1a2ee95b95870e15e29599a84f3484af1de1cec2e181", _GLYPH_TASKS),
    _font("STIXGeneral", "167378031e2dddc6216d67819c9260e9a06ffc4c478e4e23cb98a6fd44b183c2", ("printed_digits",)),
    _font("STIXGeneralBol", "e8533dc7083fa346bda1933d60ea4a83b67d0945bceaf1b3541f82b4a0e2c6a0", ("printed_digits",)),
    _font("STIXGeneralBolIta", "98788fd4ba48dfbb2bd026c0e20a247a8b06c7372879628b7a6bb0d5bb09736c",
          ("printed_digits",)),
    _font("STIXGeneralItalic", "6cfcb333d22b7c3c623bdfd40174f14c85c3d6731ca6166c1edc80140eae8527",
          ("printed_digits",)),
    _font("cmb10", "074497b50c43ea57597181591f9893d38fc12a87e95104f5657fc2481f61a23a", ("printed_digits",)),
    _font("cmr10", "4dd9761b058c009db9b2145f55ee6617d093c273dd3d6c5b3e43ff6110fa9bf6", ("printed_digits",)),
    _font("cmss10", "7df91a83d05b2e471ec638cb0b435a360a3c792b09fc42a7da67e91f2e79115a", ("printed_digits",)),
    _font("cmti10", "f9f1f9f654308ae82f7be4441ae89b080896b34cc220bbea173c5e9adcfe3ef7", ("printed_digits",)),
    _font("cmtt10", "6211f09ae93599991afda970c24669dad1a77e253d915624fbf212f702f071d7", ("printed_digits",)),
    # copy-detection originals: two scenes, whole (the stereo pair is one scene: the right view is the left one seen
    # from a few centimetres aside, usable as a viewpoint-change query, never as a distinct original)
    _image(_SKI, "data/motorcycle_left.png", "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
           "photo", _COPY, "a motorcycle in a workshop (left view)", scene="skimage:motorcycle"),
    _image(_SKI, "data/motorcycle_right.png", "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
           "photo", _COPY, "a motorcycle in a workshop (right view)", scene="skimage:motorcycle"),
    _image(_SKI, "data/rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
           "photo", _COPY, "a rocket on its launch pad at night"),
    # untuned: 200 crops of faces and backgrounds, whole, and the left 60% of seven photos (the rest is curation's)
    _image(_SKI, "data/lfw_subset.npy", "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c",
           "photo_stack", _UNTUNED, "LFW crops, 25x25 gray in [0, 1]: 100 faces then 100 backgrounds"),
    _image(_SKI, "data/astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
           "photo", _SHARED, "an astronaut (Eileen Collins)"),
    _image(_SKI, "data/camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
           "photo", _SHARED, "a cameraman on a lawn, gray"),
    _image(_SKI, "data/chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
           "photo", _SHARED, "a tabby cat (skimage.data.chelsea and .cat)"),
    _image(_SKI, "data/coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
           "photo", _SHARED, "a cup of coffee on a wooden table"),
    _image(_SKI, "data/clock_motion.png", "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955",
           "photo", _SHARED, "a wall clock, blurred by the camera's motion, gray"),
    _image(_SKI, "data/retina.jpg", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
           "photo", _SHARED, "a human retina (fundus camera), 1411 px"),
    _image(_MPL, "mpl-data/sample_data/grace_hopper.jpg",
           "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130", "photo", _SHARED,
           "Grace Hopper's portrait"),
    # curation only: small or non-photo real images, each a class of its own
    _image(_SKI, "data/microaneurysms.png", "a1e1be59aa447f8ce082f7fa809997ab369a2b137cb6c4202abc647c7ccf6456",
           "photo", _CURATION, "a 102 px detail of another retina (green channel), with lesions"),
    _image(_MPL, "mpl-data/sample_data/s1045.ima.gz",
           "32b424d64f62b7e71cb24d29fd53938ad5664d608055a67ab2b2af4369f8b89e", "mri", _CURATION,
           "a sagittal MRI slice of a head, 256 x 256"),
    _image(_MPL, "mpl-data/sample_data/jacksboro_fault_dem.npz",
           "d493f50a33e82a4420494c54d1fca1539d177bdc27ab190bc5fe6e92f62fb637", "elevation", _CURATION,
           "the elevation around the Jacksboro fault, 344 x 403", member="elevation"),
    _image(_MPL, "mpl-data/sample_data/topobathy.npz",
           "0244e03291702df45024dcb5cacbc4f3d4cb30d72dfa7fd371c4ac61c42b4fbf", "elevation", _CURATION,
           "topography and bathymetry of a coast, 91 x 120", member="topo"),
)  # fmt: skip
SHIPPED_IMAGES: dict[str, ShippedImage] = {e.id: e for e in _ENTRIES}

# The image files of the packages' data folders that no purpose takes, and why (tests/test_image_registry.py checks
# that every image file shipped there is registered or listed here, so a new one is noticed). Unused fonts are free
# glyph sources and are not listed.
UNREGISTERED: dict[str, str] = {
    "skimage:data/chessboard_GRAY.png": "synthetic",
    "skimage:data/chessboard_RGB.png": "synthetic",
    "skimage:data/color.png": "synthetic (colorwheel)",
    "skimage:data/phantom.png": "synthetic (Shepp-Logan phantom)",
    "skimage:data/horse.png": "a drawn silhouette",
    "skimage:data/logo.png": "a drawing (scikit-image's logo)",
    "skimage:data/multipage.tif": "synthetic test file",
    "skimage:data/multipage_rgb.tif": "synthetic test file",
    "skimage:data/no_time_for_that_tiny.gif": "an animation 25 x 14 px: too small",
    "skimage:data/motorcycle_disp.npz": "the disparity of the motorcycle pair (copy_originals' scene), not an image",
    "matplotlib:mpl-data/sample_data/Minduka_Present_Blue_Pack.png": "a drawing",
    "matplotlib:mpl-data/sample_data/logo2.png": "a drawing (matplotlib's logo)",
    "matplotlib:mpl-data/sample_data/goog.npz": "stock prices, not an image",
    "matplotlib:mpl-data/sample_data/axes_grid/bivariate_normal.npy": "synthetic (a Gaussian)",
}

# The purpose of each task's images: a task reads only images registered for it, in its purpose
TASK_PURPOSES: dict[str, str] = {
    "digits": "tuning",
    "glyphs": "tuning",
    "digits_on_photos": "tuning",
    "printed_digits": "tuning",
    "textures": "tuning",
}


def _package_dir(package: str) -> Path | None:
    """Where ``package`` is installed, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _registered(image_id: str) -> ShippedImage:
    if image_id not in SHIPPED_IMAGES:
        raise ValueError(f"no shipped image {image_id!r} is registered in seer.data.tasks.SHIPPED_IMAGES "
                         f"({len(SHIPPED_IMAGES)} are, e.g. 'skimage:astronaut')")  # fmt: skip
    return SHIPPED_IMAGES[image_id]


_WARNED: set[Path] = set()  # files whose changed hash was already reported


@functools.cache
def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_path(image_id: str, *, needed_by: str = "") -> Path:
    """The installed file of a registered image or font.

    Its sha256 is checked once per process: a file that a package update changed gives a warning (the tasks built
    from it no longer match the results recorded in the docs), not an error.
    """
    entry = _registered(image_id)
    pip, who = _PIP[entry.package], needed_by or repr(image_id)
    root = _package_dir(entry.package)
    if root is None:
        raise RuntimeError(f"{who} needs {pip}'s {entry.path}, and {pip} is not installed: pip install {pip}")
    path = root / entry.path
    if not path.is_file():
        raise FileNotFoundError(f"{who} needs {path}, which the installed {pip} does not have; reinstall it "
                                f"(pip install --force-reinstall {pip})")  # fmt: skip
    got = _file_sha256(str(path))
    if got != entry.sha256 and path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(f"{path} ({image_id!r}) is not the file seer registered (sha256 {got[:12]}..., registered "
                      f"{entry.sha256[:12]}...): a {pip} update changed it, so what is built from it differs from "
                      "the recorded results", stacklevel=2)  # fmt: skip
    return path


@functools.lru_cache(maxsize=64)
def _decode(path: str, member: str) -> np.ndarray:
    """A shipped file's array (read-only: it is cached), by its format."""
    if path.endswith(".csv.gz"):
        with gzip.open(path, "rt") as f:
            array = np.loadtxt(f, delimiter=",")
    elif path.endswith(".ima.gz"):  # matplotlib's MRI slice: raw little-endian uint16, 256 x 256
        with gzip.open(path, "rb") as f:
            array = np.frombuffer(f.read(), "<u2").reshape(256, 256).copy()
    elif path.endswith(".npy"):
        array = np.load(path, allow_pickle=False)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            array = z[member]
    else:
        with Image.open(path) as im:
            array = np.asarray(im)
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def _span(entry: ShippedImage, purpose: str, needed_by: str) -> tuple[float, float]:
    """The columns of ``entry`` that serve ``purpose``; ValueError when none do."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; choose one of {list(PURPOSES)}")
    span = entry.span(purpose)
    if span is None:
        who = f"{needed_by} asks for" if needed_by else "asked for"
        raise ValueError(f"{who} shipped image {entry.id!r} as {purpose!r}, but it serves {list(entry.purposes)} "
                         "only (seer.data.tasks.SHIPPED_IMAGES)")  # fmt: skip
    return span


def shipped_image(image_id: str, purpose: str, *, needed_by: str = "") -> np.ndarray:
    """The part of a registered image that serves ``purpose``: its columns for that purpose, at full height.

    Photos are uint8 ``[H, W]`` (gray) or ``[H, W, 3]``, as decoded; other kinds are described by ``KINDS``. The
    array is read-only (shared by every caller). An image that does not serve ``purpose`` raises ValueError.
    """
    entry = _registered(image_id)
    span = _span(entry, purpose, needed_by)
    if entry.kind == "font":
        raise ValueError(f"{image_id!r} is a font, not an image: use shipped_path({image_id!r})")
    array = _decode(str(shipped_path(image_id, needed_by=needed_by)), entry.member)
    if span == (0.0, 1.0):
        return array
    width = array.shape[1]
    return array[:, int(span[0] * width) : int(span[1] * width)]


def shipped_images(purpose: str) -> dict[str, np.ndarray]:
    """Every registered image (fonts aside) that serves ``purpose``: ``{id: its columns for purpose}``.

    Raises RuntimeError naming the package when one that holds such an image is not installed.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; choose one of {list(PURPOSES)}")
    ids = [e.id for e in SHIPPED_IMAGES.values() if purpose in e.purposes and e.kind != "font"]
    return {i: shipped_image(i, purpose) for i in ids}


def _task_image(task: str, image_id: str) -> np.ndarray:
    """What task ``task`` reads: an image registered for that task, in the task's purpose."""
    entry = _registered(image_id)
    if task not in entry.tasks:
        raise ValueError(f"task {task!r} reads shipped image {image_id!r}, which is not registered for it (it is for "
                         f"{list(entry.tasks) or 'no task'}): register it in SHIPPED_IMAGES first")  # fmt: skip
    return shipped_image(image_id, TASK_PURPOSES[task], needed_by=f"task {task!r}")


def _task_fonts(task: str) -> list[str]:
    """The font files registered for ``task`` (each serving the task's purpose), sorted by path."""
    fonts = [e for e in SHIPPED_IMAGES.values() if e.kind == "font" and task in e.tasks]
    for entry in fonts:
        _span(entry, TASK_PURPOSES[task], f"task {task!r}")
    return sorted(str(shipped_path(e.id, needed_by=f"task {task!r}")) for e in fonts)


# ---------------------------------------------------------------------------------------------------------------------
# The tasks


@functools.cache
def _sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos, the backgrounds of digits_on_photos."""
    return tuple(_task_image("digits_on_photos", i) for i in ("sklearn:china", "sklearn:flower"))


def _photo_patch(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square patch (1-4 canvas sides wide) of one of scikit-learn's sample photos, ``[size, size, 3]``."""
    photos = _sample_photos()
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(size, 4 * size))
    y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
    patch = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(patch, np.float32)


def _place(obj: Image.Image, size: int, rng: np.random.Generator, background: str = "plain",
           min_scale: float = 0.45) -> Image.Image:  # fmt: skip
    """``obj`` (grayscale, object bright on black) resized to a random fraction of the canvas, at a random position,
    over a ``background`` with noise, returned as RGB.

    ``"plain"``: a dark gray with a slight random tint, the object light; ``"photo"``: a darkened photo patch, the
    object white (or black on a bright patch).
    """
    scale = rng.uniform(min_scale, 0.95)
    side = max(4, int(round(size * scale)))
    w, h = obj.size
    ratio = side / max(w, h)
    obj = obj.resize((max(1, int(round(w * ratio))), max(1, int(round(h * ratio)))), Image.Resampling.BICUBIC)
    x = int(rng.integers(0, size - obj.width + 1))
    y = int(rng.integers(0, size - obj.height + 1))
    mask = np.zeros((size, size, 1), np.float32)
    mask[y : y + obj.height, x : x + obj.width, 0] = np.asarray(obj, np.float32) / 255.0
    if background == "plain":
        bg = np.full((size, size, 3), rng.uniform(0, 80)) + rng.uniform(-10, 10, 3)
        fg = rng.uniform(170, 255) + rng.uniform(-20, 20, 3)
    elif background == "photo":
        bg = _photo_patch(size, rng) * 0.6
        fg = np.full(3, 255.0 if bg.mean() < 110 else 0.0)
    else:
        raise ValueError(f"background must be 'plain' or 'photo', got {background!r}")
    img = bg * (1 - mask) + fg * mask
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _digits(n_train: int, n_test: int, size: int, seed: int, background: str = "plain"):
    table = _task_image("digits" if background == "plain" else "digits_on_photos", "sklearn:digits")
    digit_images, targets = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    split = int(len(order) * 0.7)  # train / test split over the source digits: no digit image is in both
    parts = {"train": order[:split], "test": order[split:]}
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        idx = parts[part][rng.integers(0, len(parts[part]), n)]
        images = []
        for i in idx:
            digit = Image.fromarray((digit_images[i] * (255 / 16)).astype(np.uint8), "L")
            digit = digit.resize((24, 24), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(0.6))
            images.append(_place(digit, size, rng, background))
        out[part] = (images, targets[idx])
    return out, [str(d) for d in range(10)]


def _rendered(n_train: int, n_test: int, size: int, seed: int, chars: str, fonts: list[str]):
    """``chars`` rendered in ``fonts`` (a quarter of the fonts, at least 2, only in test), rotated +-15 degrees."""
    rng = np.random.default_rng(seed)
    if len(fonts) < 4:  # a registry edit, never the user's install (a missing font file raises in _task_fonts)
        raise RuntimeError(f"the rendered-glyph tasks need 4 fonts or more, {len(fonts)} are registered")
    order = rng.permutation(len(fonts))
    test_fonts = [fonts[i] for i in order[: max(2, len(fonts) // 4)]]  # fonts never seen in train
    train_fonts = [fonts[i] for i in order[len(test_fonts) :]]
    out = {}
    for part, n, pool in (("train", n_train, train_fonts), ("test", n_test, test_fonts)):
        images, labels = [], []
        for _ in range(n):
            label = int(rng.integers(len(chars)))
            font = ImageFont.truetype(pool[int(rng.integers(len(pool)))], 48)
            canvas = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(canvas).text((32, 32), chars[label], fill=255, font=font, anchor="mm")
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC)
            box = canvas.getbbox() or (0, 0, 64, 64)
            images.append(_place(canvas.crop(box), size, rng))
            labels.append(label)
        out[part] = (images, np.asarray(labels, np.int64))
    return out, list(chars)


def _glyphs(n_train: int, n_test: int, size: int, seed: int):
    # matplotlib's DejaVu Sans, Serif and Sans Mono, every style (SHIPPED_IMAGES)
    return _rendered(n_train, n_test, size, seed, "ABCDEFGHIJ", _task_fonts("glyphs"))


def _printed_digits(n_train: int, n_test: int, size: int, seed: int):
    # Computer Modern and STIX besides DejaVu: serif, sans, typewriter and italic digits of other designs
    return _rendered(n_train, n_test, size, seed, "0123456789", _task_fonts("printed_digits"))


def _digits_on_photos(n_train: int, n_test: int, size: int, seed: int):
    return _digits(n_train, n_test, size, seed, background="photo")


# scikit-image's bundled photos of surfaces: materials, microscopy, astronomy and print; class -> registered image
_TEXTURES = {"brick": "skimage:brick", "grass": "skimage:grass", "gravel": "skimage:gravel", "coins": "skimage:coins",
             "moon": "skimage:moon", "hubble_deep_field": "skimage:hubble_deep_field",
             "immunohistochemistry": "skimage:ihc", "text": "skimage:text", "page": "skimage:page",
             "cell": "skimage:cell"}  # fmt: skip


def _textures(n_train: int, n_test: int, size: int, seed: int):
    photos = [np.asarray(Image.fromarray(_task_image("textures", i)).convert("L"), np.float32)
              for i in _TEXTURES.values()]  # fmt: skip
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images, labels = [], []
        for _ in range(n):
            label = int(rng.integers(len(photos)))
            photo = photos[label]
            # train patches come from the left 60% of each photo, test patches from the right 40%: no shared pixels
            cut = int(photo.shape[1] * 0.6)
            region = photo[:, :cut] if part == "train" else photo[:, cut:]
            side = int(rng.integers(24, min(128, *region.shape) + 1))
            y = int(rng.integers(0, region.shape[0] - side + 1))
            x = int(rng.integers(0, region.shape[1] - side + 1))
            patch = np.rot90(region[y : y + side, x : x + side], int(rng.integers(4)))
            patch = Image.fromarray(patch.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
            # a random gain and contrast, so a photo's mean brightness alone does not name it
            a = np.asarray(patch, np.float32)
            a = (a - a.mean()) * rng.uniform(0.6, 1.4) + a.mean() * rng.uniform(0.6, 1.4) + rng.normal(0, 4, a.shape)
            images.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB"))
            labels.append(label)
        out[part] = (images, np.asarray(labels, np.int64))
    return out, list(_TEXTURES)


TASKS: dict[str, Callable] = {
    "digits": _digits,
    "glyphs": _glyphs,
    "digits_on_photos": _digits_on_photos,
    "printed_digits": _printed_digits,
    "textures": _textures,
}


def make_task(name: str, n_train: int = 2000, n_test: int = 500, size: int = 32, seed: int = 0) -> dict:
    """``{"train": (images, labels), "test": (images, labels), "classes": [...]}`` of task ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    parts, classes = TASKS[name](n_train, n_test, size, seed)
    return {**parts, "classes": classes}


def write_task(name: str, root: str | os.PathLike, **kwargs) -> dict:
    """Write task ``name`` as ``root/{train,test}/<class>/<index>.png``; returns the file lists and labels."""
    task = make_task(name, **kwargs)
    root = Path(root)
    files = {}
    for part in ("train", "test"):
        images, labels = task[part]
        paths = []
        for i, (img, y) in enumerate(zip(images, labels)):
            d = root / part / task["classes"][y]
            d.mkdir(parents=True, exist_ok=True)
            paths.append(d / f"{i:06d}.png")
            img.save(paths[-1])
        files[part] = (paths, labels)
    return {"root": root, "files": files, "classes": task["classes"]}
