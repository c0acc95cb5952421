"""The local image store: what `openfx-cli fn build` produced on this machine, keyed by image reference.

KETI's workflow deploys by image (`fn build`, then `fn deploy` sends `Image` and no source). The
embedded platform runs no containers, so `fn build` also keeps each rendered build context here
(`images/<slug>/`, the context plus `image.json`), and the embedded gateway starts a Deploy that
names one of these images from the context's own copy of the function folder. The copy, not the
folder it was built from, is what runs: as with a real image, editing the source changes nothing
until the next `fn build`.

There is one store per user, like Docker's local images: `fn build` run in a function's own folder
(KETI's workflow) and a gateway started from anywhere (`openfx-cli up -f other/openfx.yaml`,
`python -m openfx.gateway`) find the same images, whatever folder each was started in.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from openfx import env
from openfx.config import FunctionSpec

META = "image.json"


def images_dir() -> Path:
    """`$OPENFX_HOME/images` (the state folder it names), else `~/.openfx/images`: never relative
    to the folder a command runs in, which is what kept `fn build` and the gateway apart."""
    home = env.optional("OPENFX_HOME")
    return (Path(home) if home else Path.home() / ".openfx") / "images"


def _slug(image: str) -> str:
    """A folder name for an image reference (readable, and distinct for distinct references)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image).strip("._")[:80] or "image"
    return f"{readable}-{hashlib.sha256(image.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class StoredImage:
    image: str
    function: str  # the name it was built as
    handler_dir: Path  # inside the stored context
    handler_file: str
    handler_name: str

    @property
    def requirements(self) -> Path:
        """The function folder's requirements.txt (the context always has one, maybe empty)."""
        return self.handler_dir.parent / "requirements.txt"


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, name: str, spec: FunctionSpec) -> StoredImage:
        """Render `spec`'s build context into the store under its image reference."""
        from openfx.build.render import render_context

        image = spec.image or name
        self.root.mkdir(parents=True, exist_ok=True)
        context = render_context(_slug(image), spec, self.root)
        inside = context / "function" / spec.handler_dir.relative_to(spec.source_dir)
        meta = {
            "image": image,
            "function": name,
            "handler_dir": str(inside.relative_to(context)),
            "handler_file": spec.handler.file,
            "handler_name": spec.handler.name,
        }
        (context / META).write_text(json.dumps(meta, indent=2) + "\n")
        return self._read(context)

    def _read(self, context: Path) -> StoredImage:
        meta = json.loads((context / META).read_text())
        return StoredImage(
            image=meta["image"],
            function=meta["function"],
            handler_dir=context / meta["handler_dir"],
            handler_file=meta["handler_file"],
            handler_name=meta["handler_name"],
        )

    def get(self, image: str) -> StoredImage | None:
        context = self.root / _slug(image)
        if not (context / META).is_file():
            return None
        try:
            stored = self._read(context)
        except (OSError, ValueError, KeyError):
            return None
        return stored if stored.image == image else None

    def images(self) -> list[str]:
        """Every image reference in the store."""
        found = []
        for meta in sorted(self.root.glob(f"*/{META}")) if self.root.is_dir() else ():
            try:
                found.append(json.loads(meta.read_text())["image"])
            except (OSError, ValueError, KeyError):
                continue
        return found


def missing_requirements(requirements: Path) -> list[str]:
    """The lines of `requirements` the running interpreter's environment does not satisfy.

    The embedded platform runs every function with the gateway's interpreter, so a function's
    packages must be installed in that one shared environment (the repository's `.venv`); a
    function whose packages are absent is refused at deploy instead of failing at import.
    Lines that are not plain requirements (options, URLs, `-r`) cannot be checked and are reported.
    """
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    try:
        lines = requirements.read_text().splitlines()
    except FileNotFoundError:
        return []
    for raw in lines:
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            missing.append(line)
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            missing.append(f"{line} (installed: {version})")
    return missing
