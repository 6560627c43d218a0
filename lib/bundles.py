"""Trained actor bundles: download, verify and unpack them into ``experiments/``, or pack one.

A bundle is a ``.tar.gz`` of one actor folder. Its members are the folder's entries prefixed by the
actor's name (``ACTOR/regressor/...``), so ``tar xzf`` by hand gives the same layout as this module.

The manifest (``checkpoints.txt``) lists one bundle per line, ``ACTOR SHA256 URL``; a line whose first
non-blank character is ``#`` is a comment. The SHA-256 is that of the ``.tar.gz`` file.

Safety, in order: the download goes to a temporary file and its SHA-256 is checked before the archive
is opened; every member is then checked by ``check_members`` (no absolute paths, no ``..``, nothing
outside ``ACTOR/``, no link pointing out of it, no device files); extraction goes to a temporary folder
inside the experiments folder, which is renamed into place only once complete. Unpacking stops at a
size limit (``--max-gb``, default ``MAX_UNPACKED_GB``): the sizes the archive declares are checked
before anything is written, and the bytes actually written while extracting. A refused bundle leaves
nothing behind; the temp files of a killed run are removed by the next run (it holds
``experiments/.bundles.lock`` meanwhile, so a second ``checkpoints.sh`` stops with an error naming the
first). An installed actor folder holds ``.bundle.sha256``, the hash of the bundle it came from, which
is how a re-run knows it can skip it.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lib.atomic import atomic_path, is_partial
from lib.errors import ProjectError
from lib.lock import LOCK_NAME, locked
from lib.paths import EXPERIMENTS, REPO_ROOT

MANIFEST = REPO_ROOT / "checkpoints.txt"
MAX_UNPACKED_GB = 20.0  # a trained actor (checkpoints, GEM, videos) is a few GB at NeRSemble scale
MAX_MEMBERS = 200_000
STAMP = ".bundle.sha256"
BUNDLES_LOCK = ".bundles.lock"
DOWNLOAD_TIMEOUT_S = 60
_ACTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Python's own extraction filter (3.11.4+) as a second line behind check_members, not instead of it.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class BundleError(ProjectError):
    """A bundle that cannot be fetched, verified, unpacked or packed; the message says what to do."""


@dataclass(frozen=True)
class Bundle:
    actor: str
    sha256: str  # of the .tar.gz, lowercase hex
    url: str


def read_manifest(path: str | Path) -> list[Bundle]:
    """The bundles listed in a manifest file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"manifest {path} not found — pass --manifest PATH or restore checkpoints.txt")
    bundles: dict[str, Bundle] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) != 3:
            raise BundleError(f"{where}: expected 'ACTOR SHA256 URL', got {line.strip()!r}")
        actor, sha, url = fields[0], fields[1].lower(), fields[2]
        if not _ACTOR_NAME.fullmatch(actor):
            raise BundleError(f"{where}: actor name {actor!r} must be letters, digits, '.', '_' or '-', "
                              "not starting with '.' or '-'")
        if not _SHA256.fullmatch(sha):
            raise BundleError(f"{where}: {fields[1]!r} is not a SHA-256 (64 hex digits)")
        if not url.startswith(("https://", "http://", "file:")):
            raise BundleError(f"{where}: URL {url!r} must start with https://, http:// or file:")
        if actor in bundles:
            raise BundleError(f"{where}: actor {actor!r} is listed twice; keep one line per actor")
        bundles[actor] = Bundle(actor, sha, url)
    return list(bundles.values())


# ---------------------------------------------------------------- member checks

def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _resolve(parts: list[str], links: dict[tuple[str, ...], str], hops: int = 0) -> list[str] | None:
    """Where a path (relative to the extraction folder) ends up once the archive's own symbolic links
    are followed; None when it climbs above the folder, is absolute or loops."""
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get(tuple(out))
        if target is not None:
            if hops >= 40 or target.startswith("/"):
                return None
            out = _resolve(out[:-1] + target.split("/"), links, hops + 1)
            if out is None:
                return None
    return out


def check_members(members: list[tarfile.TarInfo], actor: str) -> None:
    """Raise BundleError naming the first member that could land outside ``ACTOR/`` once extracted.

    Allowed: folders, regular files, symbolic links whose target (followed through the archive's other
    links) stays inside ``ACTOR/``, hard links to an earlier regular file of the archive. Refused:
    absolute names, any ``..``, names outside ``ACTOR/``, duplicates, members under a symbolic link of
    the archive (extraction would write through it), device files, FIFOs and other special members.
    """
    links = {tuple(_parts(m.name)): m.linkname for m in members if m.issym()}
    seen_files: set[tuple[str, ...]] = set()
    seen: set[tuple[str, ...]] = set()
    for m in members:
        name = m.name
        parts = tuple(_parts(name))

        def refuse(why: str) -> None:
            raise BundleError(f"member {name!r} {why}")

        if name.startswith("/"):
            refuse("is an absolute path")
        if ".." in name.split("/"):
            refuse("contains '..'")
        if not parts or parts[0] != actor:
            refuse(f"would land outside {actor}/")
        if parts in seen:
            refuse("appears twice in the archive")
        seen.add(parts)
        if any(parts[:i] in links for i in range(1, len(parts))):
            refuse("lies under a symbolic link of the archive")
        if m.isdir():
            continue
        if m.isreg():
            if len(parts) == 1:
                refuse(f"must be the folder {actor}/, not a file")
            seen_files.add(parts)
        elif m.issym():
            resolved = _resolve(list(parts[:-1]) + m.linkname.split("/"), links)
            if m.linkname.startswith("/") or resolved is None or resolved[:1] != [actor]:
                refuse(f"is a symbolic link to {m.linkname!r}, which points outside {actor}/")
        elif m.islnk():
            target = m.linkname
            if target.startswith("/") or ".." in target.split("/") or tuple(_parts(target)) not in seen_files:
                refuse(f"is a hard link to {target!r}, which is not an earlier file inside {actor}/")
        else:
            refuse("is a device file, FIFO or other special file")


# ---------------------------------------------------------------- fetch

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_installed(bundle: Bundle, root: Path = EXPERIMENTS) -> bool:
    """Whether ``root/ACTOR`` was installed from this very bundle (its stamp holds the same hash)."""
    stamp = Path(root) / bundle.actor / STAMP
    return stamp.is_file() and stamp.read_text().strip() == bundle.sha256


def _download(bundle: Bundle, folder: Path) -> tuple[Path, str]:
    """Download to a temporary file in ``folder``; return it and its SHA-256. Nothing is left on error."""
    fd, name = tempfile.mkstemp(prefix=f".{bundle.actor}.", suffix=".download", dir=folder)
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(bundle.url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        tmp.unlink()
        raise BundleError(f"could not download bundle {bundle.actor} from {bundle.url}: {e} — check the URL "
                          "in the manifest and the network, then run again") from e
    except BaseException:
        tmp.unlink()
        raise
    return tmp, digest.hexdigest()


def _normalise_owner_and_mode(m: tarfile.TarInfo) -> None:
    """Extracted files belong to the current user with plain modes, whatever the archive says."""
    m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
    m.mode = 0o755 if m.isdir() or m.mode & 0o111 else 0o644


def _check_size(members: list[tarfile.TarInfo], bundle: Bundle, root: Path, max_bytes: int) -> None:
    """Refuse an archive whose declared content exceeds ``max_bytes`` or the free disk, before writing."""
    declared = sum(m.size for m in members if m.isreg())
    if len(members) > MAX_MEMBERS:
        raise BundleError(f"bundle {bundle.actor} from {bundle.url} holds {len(members)} members (limit "
                          f"{MAX_MEMBERS}); nothing was written — it is not a bundle of this project")
    if declared > max_bytes:
        raise BundleError(f"bundle {bundle.actor} from {bundle.url} would unpack to {declared / 1e9:.2f} GB, over "
                          f"the limit of {max_bytes / 1e9:.2f} GB; nothing was written — if you trust it, raise the "
                          "limit with --max-gb")
    free = shutil.disk_usage(root).free
    if declared > free:
        raise BundleError(f"bundle {bundle.actor} needs {declared / 1e9:.2f} GB but {root} has {free / 1e9:.2f} GB "
                          "free; nothing was written — free space and run again")


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], staging: Path, bundle: Bundle,
             max_bytes: int) -> None:
    """Extract member by member, counting the bytes actually written against ``max_bytes``."""
    written = 0
    for m in members:
        _normalise_owner_and_mode(m)
        tar.extract(m, staging, **_DATA_FILTER)
        if m.isreg():
            written += (staging / m.name).stat().st_size
            if written > max_bytes:
                raise BundleError(f"bundle {bundle.actor} from {bundle.url} wrote more than its limit of "
                                  f"{max_bytes / 1e9:.2f} GB while unpacking (it declares less: the archive "
                                  "lies about its sizes); nothing was kept")


def _unpack(archive: Path, bundle: Bundle, root: Path, force: bool, max_bytes: int) -> None:
    """Extract into a temporary folder inside ``root``, then rename ``ACTOR/`` into place."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            try:
                check_members(members, bundle.actor)
            except BundleError as e:
                raise BundleError(f"bundle {bundle.actor} from {bundle.url} refused: {e}; nothing was "
                                  "written — the bundle is unsafe, ask its publisher for a clean one") from e
            _check_size(members, bundle, root, max_bytes)
            staging = Path(tempfile.mkdtemp(prefix=f".{bundle.actor}.", suffix=".unpack", dir=root))
            try:
                _extract(tar, members, staging, bundle, max_bytes)
                unpacked = staging / bundle.actor
                if not unpacked.is_dir():
                    raise BundleError(f"bundle {bundle.actor} from {bundle.url} holds no folder "
                                      f"{bundle.actor}/; nothing was written")
                (unpacked / STAMP).write_text(bundle.sha256 + "\n")
                dest = root / bundle.actor
                if dest.exists() or dest.is_symlink():
                    if not force:
                        raise _exists_error(dest)
                    os.rename(dest, staging / "previous")  # removed with the staging folder
                os.rename(unpacked, dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        raise BundleError(f"bundle {bundle.actor} from {bundle.url} could not be unpacked ({e}); "
                          "nothing was written") from e


def _exists_error(dest: Path) -> BundleError:
    return BundleError(f"{dest} already exists and was not installed from this bundle; move it away or "
                       "pass --force to replace it")


def fetch(bundle: Bundle, root: Path = EXPERIMENTS, force: bool = False,
          max_gb: float = MAX_UNPACKED_GB) -> bool:
    """Install one bundle into ``root/ACTOR``; False when it is already installed (skipped).

    An existing ``root/ACTOR`` that did not come from this very bundle is left alone unless ``force``.
    Unpacking stops at ``max_gb`` gigabytes (declared or written).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with locked(root, "the experiments folder (bundles)", root / BUNDLES_LOCK, clean=False):
        remove_leftovers(root)
        dest = root / bundle.actor
        if dest.exists() and not force:
            if is_installed(bundle, root):
                return False
            raise _exists_error(dest)
        archive, actual = _download(bundle, root)
        try:
            if actual != bundle.sha256:
                raise BundleError(f"bundle {bundle.actor} from {bundle.url} fails its checksum: expected sha256 "
                                  f"{bundle.sha256}, got {actual}; nothing was written — the download is corrupt "
                                  "or the manifest line is stale")
            _unpack(archive, bundle, root, force, int(max_gb * 1e9))
        finally:
            archive.unlink()
    return True


def remove_leftovers(root: Path) -> list[Path]:
    """Delete the temp downloads, unpack folders and partial packs of killed runs (call holding the
    bundles lock). -> what was removed"""
    removed = []
    for path in Path(root).glob(".*"):
        if path.name.endswith((".download", ".unpack", ".partial")):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- pack

def _info(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    """A member with fixed time and owner, so the same folder always packs to the same bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def _tree(folder: Path, arcname: str, top: bool) -> list[tuple[tarfile.TarInfo, Path | None]]:
    """The members for ``folder`` and everything under it, sorted by name at every level."""
    members = [(_info(arcname, tarfile.DIRTYPE, 0o755), None)]
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path, name = Path(entry.path), f"{arcname}/{entry.name}"
        if (top and entry.name == STAMP) or entry.name == LOCK_NAME or is_partial(path):
            continue  # bookkeeping of this machine: an install stamp, locks, writes in progress
        if entry.is_symlink():
            members.append((_info(name, tarfile.SYMTYPE, 0o777, linkname=os.readlink(path)), None))
        elif entry.is_dir():
            members += _tree(path, name, top=False)
        elif entry.is_file():
            st = entry.stat()
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            members.append((_info(name, tarfile.REGTYPE, mode, size=st.st_size), path))
        else:
            raise BundleError(f"{path} is not a file, folder or symbolic link; remove it before packing")
    return members


def pack(actor: str, root: Path = EXPERIMENTS, out: Path | None = None) -> tuple[Path, str]:
    """Pack ``root/ACTOR/`` into a deterministic ``.tar.gz`` (default ``root/ACTOR.tar.gz``).

    Returns the archive and its SHA-256. Refuses what fetch would refuse (e.g. a link out of the folder).
    """
    root = Path(root)
    src = root / actor
    if not _ACTOR_NAME.fullmatch(actor):
        raise BundleError(f"actor name {actor!r} must be letters, digits, '.', '_' or '-'")
    if not src.is_dir():
        raise BundleError(f"no actor folder at {src} — train the actor first (./run.sh CONFIG) or check "
                          "the name and --root")
    out = Path(out) if out is not None else root / f"{actor}.tar.gz"
    members = _tree(src, actor, top=True)
    try:
        check_members([m for m, _ in members], actor)
    except BundleError as e:
        raise BundleError(f"cannot pack {src}: {e}; fix the folder first") from e
    with locked(root, "the experiments folder (bundles)", root / BUNDLES_LOCK, clean=False), atomic_path(out) as tmp:
        # An empty gzip file name and mtime 0 keep the header independent of where and when we pack.
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, path in members:
                if path is None:
                    tar.addfile(info)
                else:
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
    return out, _sha256_file(out)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints.sh",
        description="Download, verify and unpack trained actor bundles into experiments/, or pack one.",
        epilog="examples:  ./checkpoints.sh            all bundles in checkpoints.txt\n"
               "           ./checkpoints.sh nersemble_306\n"
               "           ./checkpoints.sh --pack synthetic_a --url-base https://example.org/gem\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("actors", nargs="*", metavar="ACTOR", help="bundles to fetch (default: all listed)")
    parser.add_argument("--manifest", type=Path, metavar="PATH", default=MANIFEST, help="manifest file (default: checkpoints.txt)")
    parser.add_argument("--root", type=Path, metavar="DIR", default=EXPERIMENTS, help="experiments folder (default: experiments/)")
    parser.add_argument("--force", action="store_true", help="replace an existing actor folder")
    parser.add_argument("--max-gb", type=float, default=MAX_UNPACKED_GB, metavar="GB",
                        help=f"refuse a bundle that unpacks to more than this (default {MAX_UNPACKED_GB:g})")
    parser.add_argument("--pack", metavar="ACTOR", help="pack experiments/ACTOR into a bundle instead")
    parser.add_argument("--out", type=Path, metavar="PATH", help="with --pack: the archive (default: experiments/ACTOR.tar.gz)")
    parser.add_argument("--url-base", metavar="URL", help="with --pack: where the archive will be published; the printed "
                                           "manifest line's URL is URL_BASE/ACTOR.tar.gz (default: a file: URL)")
    args = parser.parse_args(argv)
    if args.pack is None and (args.out is not None or args.url_base is not None):
        parser.error("--out and --url-base go with --pack ACTOR")
    if args.pack is not None and args.actors:
        parser.error("--pack takes one actor; do not also name actors to fetch")
    try:
        if args.pack is not None:
            out, sha = pack(args.pack, args.root, args.out)
            url = f"{args.url_base.rstrip('/')}/{out.name}" if args.url_base else out.resolve().as_uri()
            print(f"{args.pack} {sha} {url}")
            return 0
        bundles = read_manifest(args.manifest)
        listed = {b.actor: b for b in bundles}
        unknown = [a for a in args.actors if a not in listed]
        if unknown:
            raise BundleError(f"{', '.join(unknown)} not in {args.manifest}; listed: "
                              f"{', '.join(listed) or 'none'}")
        chosen = [listed[a] for a in args.actors] if args.actors else bundles
        if not chosen:
            print(f"{args.manifest} lists no bundles; nothing to download")
        for bundle in chosen:
            if not args.force and is_installed(bundle, args.root):
                print(f"{bundle.actor}: already installed from this bundle, skipped")
                continue
            print(f"{bundle.actor}: downloading {bundle.url}", flush=True)
            fetch(bundle, args.root, args.force, args.max_gb)
            print(f"{bundle.actor}: verified and unpacked into {args.root / bundle.actor}")
        return 0
    except ProjectError as e:  # BundleError, LockHeld, DiskFullError
        print(f"checkpoints.sh: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
