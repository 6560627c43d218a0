"""checkpoints.sh / lib.bundles against bundles served by a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from lib.bundles import STAMP, Bundle, BundleError, check_members, fetch, pack, read_manifest
from lib.paths import REPO_ROOT

ACTOR = "fake"


@pytest.fixture
def server(tmp_path):
    """(served folder, base URL, list of requested paths) for an HTTP server in a thread."""
    served = tmp_path / "served"
    served.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", requested
    httpd.shutdown()
    httpd.server_close()


def make_actor(root: Path) -> Path:
    """A tiny trained-actor folder: nested files, an executable, an internal relative symlink."""
    actor = root / ACTOR
    (actor / "regressor" / "checkpoints").mkdir(parents=True)
    (actor / "gem").mkdir()
    (actor / "regressor" / "checkpoints" / "step_10.pt").write_bytes(bytes(range(256)) * 40)
    (actor / "regressor" / "config.yml").write_text("actor:\n  name: fake\n")
    (actor / "gem" / "gem.npz").write_bytes(os.urandom(3000))
    (actor / "gem" / "render.sh").write_text("#!/bin/sh\necho hi\n")
    (actor / "gem" / "render.sh").chmod(0o755)
    os.symlink("step_10.pt", actor / "regressor" / "checkpoints" / "latest.pt")
    return actor


def tree(folder: Path) -> dict[str, object]:
    """Every entry under folder: file bytes and exec bit, link target, or 'dir' (install stamp left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == STAMP:
            continue
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = (path.read_bytes(), bool(path.stat().st_mode & 0o100))
    return out


def everything_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def packed(tmp_path, server):
    """A fake actor packed and served; returns (source actor folder, its Bundle, empty install root)."""
    served, base, _ = server
    src = make_actor(tmp_path / "src")
    archive, sha = pack(ACTOR, src.parent, served / f"{ACTOR}.tar.gz")
    dst = tmp_path / "experiments"
    dst.mkdir()
    return src, Bundle(ACTOR, sha, f"{base}/{archive.name}"), dst


def test_download_verifies_and_unpacks_the_same_files(packed):
    src, bundle, dst = packed
    assert fetch(bundle, dst) is True
    assert tree(dst / ACTOR) == tree(src)
    assert os.readlink(dst / ACTOR / "regressor" / "checkpoints" / "latest.pt") == "step_10.pt"
    assert (dst / ACTOR / STAMP).read_text().strip() == bundle.sha256
    assert everything_under(dst) == sorted(["fake"] + [f"fake/{k}" for k in tree(src)] + [f"fake/{STAMP}"])


def test_rerun_skips_an_installed_bundle_without_downloading(packed, server):
    _, bundle, dst = packed
    requested = server[2]
    assert fetch(bundle, dst) is True
    assert len(requested) == 1
    assert fetch(bundle, dst) is False
    assert len(requested) == 1


def test_existing_actor_folder_is_kept_unless_forced(packed):
    src, bundle, dst = packed
    (dst / ACTOR).mkdir()
    (dst / ACTOR / "mine.txt").write_text("local work")
    with pytest.raises(BundleError, match="already exists"):
        fetch(bundle, dst)
    assert everything_under(dst) == ["fake", "fake/mine.txt"]
    assert fetch(bundle, dst, force=True) is True
    assert tree(dst / ACTOR) == tree(src)
    assert sorted(os.listdir(dst)) == [ACTOR]  # the replaced folder and the staging folder are gone


def test_tampered_bundle_is_refused_and_nothing_written(packed, server):
    _, bundle, dst = packed
    served = server[0] / f"{ACTOR}.tar.gz"
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(BundleError) as err:
        fetch(bundle, dst)
    message = str(err.value)
    assert ACTOR in message and bundle.sha256 in message and actual in message
    assert os.listdir(dst) == []


def test_unreachable_url_names_the_url_and_leaves_nothing(tmp_path, server):
    dst = tmp_path / "experiments"
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/fake.tar.gz"
    for url in (dead, f"{server[1]}/missing.tar.gz"):
        with pytest.raises(BundleError, match=f"from {url}"):
            fetch(Bundle(ACTOR, "0" * 64, url), dst)
        assert os.listdir(dst) == []


def _archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def _evil_cases(tmp_path: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    """Each case: the member that must be refused comes last, after a harmless file."""
    ok = (_member("fake/ok.txt"), b"fine")
    return {
        "../evil": [ok, (_member("../evil"), b"x")],
        "fake/../../evil": [ok, (_member("fake/../../evil"), b"x")],
        str(tmp_path / "evil_abs"): [ok, (_member(str(tmp_path / "evil_abs")), b"x")],
        "other/evil": [ok, (_member("other/evil"), b"x")],
        "fake/etc": [ok, (_member("fake/etc", tarfile.SYMTYPE, "/etc"), None)],
        "fake/pw": [ok, (_member("fake/pw", tarfile.SYMTYPE, "/etc/passwd"), None)],
        "fake/up": [ok, (_member("fake/up", tarfile.SYMTYPE, "../../evil"), None)],
        # Lexically fake/sub/y, but fake/sub/x is itself a link to fake/, so it really is ../y.
        "fake/l": [ok, (_member("fake/sub", tarfile.DIRTYPE), None),
                   (_member("fake/sub/x", tarfile.SYMTYPE, ".."), None),
                   (_member("fake/l", tarfile.SYMTYPE, "sub/x/../y"), None)],
        "fake/d/evil": [ok, (_member("fake/d", tarfile.SYMTYPE, "."), None), (_member("fake/d/evil"), b"x")],
        "fake/h": [ok, (_member("fake/h", tarfile.LNKTYPE, "/etc/passwd"), None)],
        "fake/dev": [ok, (_member("fake/dev", tarfile.CHRTYPE), None)],
    }


@pytest.mark.parametrize("bad", ["../evil", "fake/../../evil", "ABSOLUTE", "other/evil", "fake/etc", "fake/pw", "fake/up",
                                 "fake/l", "fake/d/evil", "fake/h", "fake/dev"])
def test_unsafe_member_is_refused_and_nothing_lands_anywhere(tmp_path, server, bad):
    served, base, _ = server
    cases = _evil_cases(tmp_path)
    bad = str(tmp_path / "evil_abs") if bad == "ABSOLUTE" else bad
    data = _archive(cases[bad])
    (served / "evil.tar.gz").write_bytes(data)
    dst = tmp_path / "deep" / "experiments"
    dst.mkdir(parents=True)
    before = everything_under(tmp_path)
    with pytest.raises(BundleError, match="refused") as err:
        fetch(Bundle(ACTOR, hashlib.sha256(data).hexdigest(), f"{base}/evil.tar.gz"), dst)
    assert repr(bad) in str(err.value)
    assert everything_under(tmp_path) == before


def test_internal_links_are_accepted(tmp_path):
    members = [_member("fake", tarfile.DIRTYPE), _member("fake/a"), _member("fake/sub", tarfile.DIRTYPE),
               _member("fake/sub/up", tarfile.SYMTYPE, "../a"), _member("fake/h", tarfile.LNKTYPE, "fake/a")]
    check_members(members, ACTOR)


def test_pack_is_deterministic_across_mtimes_and_output_names(tmp_path):
    src = make_actor(tmp_path / "src")
    _, sha1 = pack(ACTOR, src.parent, tmp_path / "one.tar.gz")
    for path in src.rglob("*"):
        os.utime(path, (1e9, 1e9), follow_symlinks=False)
    _, sha2 = pack(ACTOR, src.parent, tmp_path / "two" / "other_name.tar.gz")
    assert sha1 == sha2
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert names[0] == ACTOR and all(n.startswith(f"{ACTOR}/") for n in names[1:])


def test_pack_refuses_a_link_out_of_the_actor_folder(tmp_path):
    src = make_actor(tmp_path / "src")
    os.symlink("/etc/passwd", src / "gem" / "passwd")
    with pytest.raises(BundleError, match="fake/gem/passwd"):
        pack(ACTOR, src.parent, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_manifest_errors_name_the_file_and_line(tmp_path):
    manifest = tmp_path / "checkpoints.txt"
    manifest.write_text(f"# comment\n\nfake {'a' * 64} https://x/fake.tar.gz\nbroken {'a' * 63} https://x/b\n")
    with pytest.raises(BundleError, match=f"{manifest}:4: .* is not a SHA-256"):
        read_manifest(manifest)
    manifest.write_text(f"# comment\n\nfake {'A' * 64} https://x/fake.tar.gz\n")
    assert read_manifest(manifest) == [Bundle("fake", "a" * 64, "https://x/fake.tar.gz")]


def test_shipped_manifest_parses():
    read_manifest(REPO_ROOT / "checkpoints.txt")


def test_bash_front_packs_then_fetches_and_skips(tmp_path, server):
    served, base, _ = server
    src = make_actor(tmp_path / "src")
    script = str(REPO_ROOT / "checkpoints.sh")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    packed = run("--pack", ACTOR, "--root", "src", "--out", str(served / "fake.tar.gz"), "--url-base", base)
    assert packed.returncode == 0, packed.stderr
    actor, sha, url = packed.stdout.split()
    assert (actor, url) == (ACTOR, f"{base}/fake.tar.gz")
    assert sha == hashlib.sha256((served / "fake.tar.gz").read_bytes()).hexdigest()
    (tmp_path / "manifest.txt").write_text("# test bundles\n" + packed.stdout)

    first = run("--manifest", "manifest.txt", "--root", "experiments", ACTOR)
    assert first.returncode == 0, first.stderr
    assert tree(tmp_path / "experiments" / ACTOR) == tree(src)
    again = run("--manifest", "manifest.txt", "--root", "experiments")
    assert again.returncode == 0 and "skipped" in again.stdout
    unknown = run("--manifest", "manifest.txt", "--root", "experiments", "nobody")
    assert unknown.returncode == 1 and "nobody not in" in unknown.stderr


def _serve(server, members) -> Bundle:
    data = _archive(members)
    (server[0] / "b.tar.gz").write_bytes(data)
    return Bundle(ACTOR, hashlib.sha256(data).hexdigest(), f"{server[1]}/b.tar.gz")


def test_a_bundle_over_the_size_limit_is_refused_before_anything_is_written(tmp_path, server):
    bundle = _serve(server, [(_member("fake/zeros.bin"), bytes(30_000_000))])  # 30 MB, ~30 kB packed
    dst = tmp_path / "experiments"
    with pytest.raises(BundleError, match=r"would unpack to 0\.03 GB, over the limit of 0\.01 GB.*--max-gb"):
        fetch(bundle, dst, max_gb=0.01)
    assert os.listdir(dst) == []
    assert fetch(bundle, dst, max_gb=0.1) is True  # the limit is the user's to raise
    assert (dst / ACTOR / "zeros.bin").stat().st_size == 30_000_000


def test_bytes_written_beyond_the_limit_stop_the_unpacking_even_if_the_archive_declares_less(
        tmp_path, server, monkeypatch):
    import lib.bundles

    monkeypatch.setattr(lib.bundles, "_check_size", lambda *a: None)  # an archive whose headers lie
    bundle = _serve(server, [(_member(f"fake/part{i}.bin"), bytes(4_000_000)) for i in range(4)])
    dst = tmp_path / "experiments"
    with pytest.raises(BundleError, match="wrote more than its limit"):
        fetch(bundle, dst, max_gb=0.01)
    assert os.listdir(dst) == []


def test_leftovers_of_a_killed_fetch_are_removed_by_the_next_one_and_fetches_take_turns(tmp_path, server):
    from lib.lock import LockHeld, locked
    from lib.bundles import BUNDLES_LOCK

    bundle = _serve(server, [(_member("fake/ok.txt"), b"fine")])
    dst = tmp_path / "experiments"
    (dst / ".fake.k1ll3d.unpack" / "fake").mkdir(parents=True)
    (dst / ".fake.k1ll3d.unpack" / "fake" / "big.bin").write_bytes(bytes(1000))
    (dst / ".fake.k1ll3d.download").write_bytes(b"half a download")
    with locked(dst, "the experiments folder (bundles)", dst / BUNDLES_LOCK, clean=False):
        with pytest.raises(LockHeld, match=f"process {os.getpid()}"):
            fetch(bundle, dst)
    assert fetch(bundle, dst) is True
    assert sorted(os.listdir(dst)) == [ACTOR]
