"""The dataset layout the field uses (VGGFace2 / CelebA-HQ style): `<root>/<identity>/<split>/<image>`.

- `set_A`: the images a user would publish; protections are applied here and fine-tuning trains on it.
- `set_B`: clean reference images of the same identity (identity scores compare against these).
- `set_C`: extra clean images.

Every identity, split and file name is validated before anything is written under an output root, so a
name can never escape that root (no `..`, no absolute paths, no separators, no control characters) and no
two inputs can land on the same output file after normalisation.
"""

from __future__ import annotations

import os
import posixpath
import unicodedata
from collections import defaultdict
import dataclasses
from dataclasses import dataclass

from raypdm.data.lock import LOCK_NAME
from raypdm.data.uri import entry_mtime, fs_and_path, join, to_uri

SPLITS: tuple[str, ...] = ("set_A", "set_B", "set_C")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

__all__ = [
    "SPLITS",
    "IMAGE_SUFFIXES",
    "LayoutError",
    "ImageRef",
    "validate_component",
    "output_name",
    "normalised",
    "list_images",
]


# Unicode categories no name should contain: format characters (bidi overrides and isolates, zero-width
# spaces and joiners, the BOM, soft hyphens), private use, surrogates, unassigned, line/paragraph separators.
_INVISIBLE = frozenset({"Cf", "Co", "Cs", "Cn", "Zl", "Zp"})


class LayoutError(ValueError):
    """A name or folder that does not fit the dataset layout or would escape the output root."""


def validate_component(name: str, what: str = "name") -> str:
    """Check one path component (identity, split or file name); return it unchanged or raise."""
    if not isinstance(name, str) or not name:
        raise LayoutError(f"{what} is empty")
    if name in (".", ".."):
        raise LayoutError(f"{what} {name!r} is a relative path step")
    if "/" in name or "\\" in name:
        raise LayoutError(f"{what} {name!r} contains a path separator")
    if name.startswith("~"):
        raise LayoutError(f"{what} {name!r} starts with '~' (home-directory expansion)")
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        raise LayoutError(f"{what} {name!r} looks like a drive-absolute path")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise LayoutError(f"{what} {name!r} contains control characters")
    hidden = [ch for ch in name if unicodedata.category(ch) in _INVISIBLE]
    if hidden:
        # Bidi overrides make `gpj.exe` read as `exe.jpg`; zero-width characters make two names that look the
        # same differ (or a name look empty). Both hide what a file really is from the person reading a table.
        which = ", ".join(sorted({f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}" for ch in hidden}))
        raise LayoutError(f"{what} {name!r} contains invisible or direction-changing characters ({which})")
    if name != name.strip():
        raise LayoutError(f"{what} {name!r} has leading or trailing whitespace")
    if len(name.encode()) > 200:
        raise LayoutError(f"{what} {name[:40]!r}... is longer than 200 bytes")
    return name


def normalised(name: str) -> str:
    """The form two names collide in: Unicode NFC, case-folded (macOS and Windows folders fold case)."""
    return unicodedata.normalize("NFC", name).casefold()


def output_name(name: str) -> str:
    """Stage outputs are PNG: `photo.jpg` -> `photo.png`."""
    stem, _ = posixpath.splitext(name)
    return f"{stem or name}.png"


@dataclass(frozen=True)
class ImageRef:
    """One input file of the layout. `error` is set when its name cannot be used safely."""

    identity: str
    split: str
    name: str
    src_uri: str
    error: str | None = None
    # What the listing said about the file (None when built by hand): a re-run's quick check that the
    # input is the one its manifest row was made from (see raypdm/data/resume.py).
    size: int | None = None
    mtime: float | None = None

    @property
    def out_relpath(self) -> str:
        return posixpath.join(self.identity, self.split, output_name(self.name))


def name_problem(identity: str, split: str, name: str) -> str | None:
    try:
        validate_component(identity, "identity")
        validate_component(split, "split")
        validate_component(name, "file name")
        validate_component(output_name(name), "output file name")
    except LayoutError as exc:
        return str(exc)
    return None


def list_images(
    root: str,
    *,
    identities: list[str] | None = None,
    splits: tuple[str, ...] | list[str] | None = SPLITS,
    any_split: bool = False,
    follow_symlinks: bool = False,
) -> tuple[list[ImageRef], list[str]]:
    """List every file of the layout under `root`.

    any_split: accept every sub-folder of an identity as a "split" (generated images live under
    `<identity>/<prompt slug>/`); `splits` is then ignored. Returns (refs, problems). Files whose names are
    unsafe or collide after normalisation are returned as refs with `error` set (they become error rows, the
    job goes on); folders and files that are not part of the layout at all are reported in `problems`, and
    so are hidden entries, an interrupted run's leftover staged files and symlinked folders (skipped unless
    `follow_symlinks`): nothing is dropped without a word. A file that is a symlink resolving outside the
    root becomes an error row unless `follow_symlinks`.
    """
    fs, base = fs_and_path(root)
    if not fs.exists(base) or not fs.isdir(base):
        raise LayoutError(f"dataset root {root!r} does not exist or is not a folder")
    base = base.rstrip("/")
    real_base = os.path.realpath(base) if _is_local(fs) else base
    wanted_splits = tuple(splits) if splits else SPLITS
    if identities is not None:
        for ident in identities:
            validate_component(ident, "identity")
    problems: list[str] = []
    refs: list[ImageRef] = []
    skipped: dict[str, list[str]] = defaultdict(list)  # what kind of entry -> the relative paths skipped

    def folder(entry: dict, rel: str) -> bool | None:
        """True: a folder to read; False: a symlinked folder not followed (reported); None: not a folder."""
        if entry.get("islink"):
            if not fs.isdir(entry["name"]):
                return None
            if not follow_symlinks:
                skipped["symlinked folders (follow_symlinks to read them)"].append(rel)
                return False
            return True
        return True if entry["type"] == "directory" else None

    for entry in sorted(fs.ls(base, detail=True), key=lambda e: e["name"]):
        ident = posixpath.basename(entry["name"].rstrip("/"))
        if ident.startswith(LOCK_NAME):
            continue  # a run's lock on this root (raypdm/data/lock.py): bookkeeping, not a stray entry
        if ident.startswith("."):
            skipped["hidden entries"].append(ident)
            continue
        kind = folder(entry, ident)
        if kind is False:
            continue
        if kind is None:
            if not ident.endswith((".parquet", ".yaml", ".json", ".html", ".md")):
                problems.append(f"{ident}: a file at the identity level (expected <identity>/<split>/<image>)")
            continue
        if identities is not None and ident not in identities:
            continue
        for sub in sorted(fs.ls(entry["name"], detail=True), key=lambda e: e["name"]):
            split = posixpath.basename(sub["name"].rstrip("/"))
            if split.startswith("."):
                skipped["hidden entries"].append(f"{ident}/{split}")
                continue
            kind = folder(sub, f"{ident}/{split}")
            if kind is False:
                continue
            if any_split:
                if kind is None:
                    problems.append(f"{ident}/{split}: a file at the split level (expected <identity>/<folder>/<image>)")
                    continue
            elif kind is None or split not in SPLITS:
                problems.append(f"{ident}/{split}: not a split folder (expected one of {', '.join(SPLITS)})")
                continue
            elif split not in wanted_splits:
                continue
            for f in sorted(fs.ls(sub["name"], detail=True), key=lambda e: e["name"]):
                name = posixpath.basename(f["name"].rstrip("/"))
                rel = f"{ident}/{split}/{name}"
                if ".tmp-" in name:
                    skipped["leftover temporary files (an interrupted run's staged outputs)"].append(rel)
                    continue
                if name.startswith("."):
                    skipped["hidden entries"].append(rel)
                    continue
                if f["type"] == "directory" or (f.get("islink") and fs.isdir(f["name"])):
                    problems.append(f"{rel}: nested folder ignored")
                    continue
                error = name_problem(ident, split, name)
                info = f
                if f.get("islink"):
                    target = os.path.realpath(f["name"])
                    inside = target == real_base or target.startswith(real_base.rstrip("/") + "/")
                    if error is None and not inside and not follow_symlinks:
                        error = f"{rel} is a symlink to {target}, outside the input root (follow_symlinks to read it)"
                    try:
                        info = fs.info(target)  # the size and time of what it points at
                    except OSError:  # a dangling link: reading it makes the error row
                        pass
                refs.append(ImageRef(ident, split, name, to_uri(fs, f["name"]), error, _size(info), entry_mtime(info)))
    for what, paths in skipped.items():
        shown = ", ".join(paths[:3]) + (", …" if len(paths) > 3 else "")
        problems.append(f"{len(paths)} {what} skipped: {shown}")
    if identities is not None:
        found = {r.identity for r in refs}
        for ident in identities:
            if ident not in found:
                problems.append(f"{ident}: identity not found under {root}")
    return _mark_collisions(refs), problems


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _size(info: dict) -> int | None:
    size = info.get("size")
    return int(size) if size is not None else None


def _mark_collisions(refs: list[ImageRef]) -> list[ImageRef]:
    """Two inputs that map to one output file (a.jpg + a.png, A.png + a.png) both become error rows:
    picking one silently would drop the other without a trace."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ref in enumerate(refs):
        if ref.error is None:
            key = "/".join(normalised(p) for p in (ref.identity, ref.split, output_name(ref.name)))
            groups[key].append(i)
    out = list(refs)
    for members in groups.values():
        if len(members) > 1:
            names = ", ".join(refs[i].name for i in members)
            for i in members:
                r = refs[i]
                out[i] = dataclasses.replace(
                    r, error=f"output name collides after normalisation: {r.identity}/{r.split}: {names}"
                )
    return out


def output_uri(out_root: str, ref: ImageRef) -> str:
    """Where a stage writes the output for `ref`. Only called for refs whose names were validated."""
    if ref.error is not None:
        raise LayoutError(f"refusing to write an output for an invalid name: {ref.error}")
    return join(out_root, ref.identity, ref.split, output_name(ref.name))
