#!/usr/bin/env python3
"""Makes one .deb (dpkg-deb) or .rpm (rpmbuild) of a workspace crate.

Called by packaging/build. The metadata stays where it was, in the crate's
Cargo.toml ([package.metadata.deb] and [package.metadata.generate-rpm], read
with the fields and meaning cargo-deb and cargo-generate-rpm gave them), so
the packages come out as they did without compiling those two tools.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path


class PackagingError(Exception):
    """A problem the person running packaging/build can fix."""


def run(argv, **kwargs):
    """Runs argv (no shell); its stderr goes into the error when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise PackagingError(f"{' '.join(map(str, argv))} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def crate_metadata(workspace, package):
    """The Cargo package's JSON from `cargo metadata`."""
    meta = json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"], cwd=workspace))
    for p in meta["packages"]:
        if p["name"] == package:
            return p
    raise PackagingError(f"no package {package} in the workspace")


def asset_source(crate_dir, bin_dir, source):
    """Where an asset's file is: target/release/ means the profile's binaries."""
    if source.startswith("target/release/"):
        return bin_dir / source[len("target/release/"):], True
    if source.startswith("../target/"):
        # Generated assets (covetctl's): the real target directory, wherever it is.
        path = bin_dir.parent / source[len("../target/"):]
        if not path.is_file():
            raise PackagingError(f"asset {source} ({path}) is missing")
        return path, False
    path = (crate_dir / source).resolve()
    if not path.is_file():
        raise PackagingError(f"asset {source} ({path}) is missing")
    return path, False


def stage_file(src, dest, mode, strip, allow_link):
    """Puts src at dest with mode: stripped the way cargo-deb did, hardlinked
    when that changes nothing of the original, copied otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if strip:
        run(["strip", "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note", "-o", dest, src])
    elif allow_link and (src.stat().st_mode & 0o7777) == mode:
        os.link(src, dest)
        return
    else:
        shutil.copyfile(src, dest)
    os.chmod(dest, mode)


def set_times(tree, epoch):
    """Every entry of tree gets the same mtime: reproducible archives."""
    for path in sorted(tree.rglob("*"), reverse=True):
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def shlib_depends(binaries, arch):
    """cargo-deb's `$auto`: dpkg-shlibdeps, libgcc left out (always there)."""
    with tempfile.TemporaryDirectory() as work:
        # dpkg-shlibdeps wants a debian/control in its working directory.
        (Path(work) / "debian").mkdir()
        (Path(work) / "debian/control").touch()
        out = run(
            ["dpkg-shlibdeps", "-xlibgcc", "-O", *binaries],
            cwd=work,
            env={**os.environ, "DEB_HOST_ARCH": arch},
        )
    for line in out.splitlines():
        if line.startswith("shlibs:Depends="):
            deps = [d.strip() for d in line.split("=", 1)[1].split(",")]
            return [d for d in deps if d and not d.startswith(("libgcc-", "libgcc1"))]
    raise PackagingError("dpkg-shlibdeps printed no shlibs:Depends")


def wrap79(text):
    return textwrap.wrap(" ".join(text.split()), width=79)


def build_deb(pkg, args, work):
    meta = pkg["metadata"]["deb"]
    crate_dir = Path(pkg["manifest_path"]).parent
    name = meta.get("name", pkg["name"])
    version = args.version or f"{pkg['version']}-1"
    arch = run(["dpkg", "--print-architecture"]).strip()
    root = work / "root"
    binaries = []
    for source, dest, mode in meta["assets"]:
        src, built = asset_source(crate_dir, args.bin_dir, source)
        if dest.endswith("/"):
            dest += src.name
        target = root / dest.lstrip("/")
        stage_file(src, target, int(mode, 8), strip=built, allow_link=False)
        if built:
            binaries.append(target)
    doc = root / "usr/share/doc" / name
    doc.mkdir(parents=True, exist_ok=True)
    copyright_text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {pkg['name']}\n"
        f"Copyright: {meta['copyright']}\n"
        f"License: {pkg['license']}\n"
    )
    (doc / "copyright").write_text(copyright_text)
    if "changelog" in meta:
        text = (crate_dir / meta["changelog"]).read_bytes()
        (doc / "changelog.Debian.gz").write_bytes(gzip.compress(text, 9, mtime=0))
    for f in (doc / "copyright", doc / "changelog.Debian.gz"):
        if f.exists():
            os.chmod(f, 0o644)

    files = sorted(p for p in root.rglob("*") if p.is_file())
    # cargo-deb's estimate: a KiB of file system overhead per file.
    installed_size = sum((p.stat().st_size + 2047) // 1024 for p in files)
    depends = []
    for dep in (d.strip() for d in meta.get("depends", "").split(",")):
        if dep == "$auto":
            depends += shlib_depends(binaries, arch)
        elif dep:
            depends.append(dep)

    control = [
        f"Package: {name}",
        f"Version: {version}",
        f"Architecture: {arch}",
        f"Section: {meta['section']}",
        f"Priority: {meta['priority']}",
        f"Maintainer: {meta['maintainer']}",
        f"Installed-Size: {installed_size}",
    ]
    if depends:
        control.append(f"Depends: {', '.join(depends)}")
    if meta.get("recommends"):
        control.append(f"Recommends: {meta['recommends'].strip()}")
    control.append(f"Description: {pkg['description']}")
    control += [f" {line}" for line in wrap79(meta.get("extended-description", ""))]

    debian = root / "DEBIAN"
    debian.mkdir()
    (debian / "control").write_text("\n".join(control) + "\n")
    conffiles = meta.get("conf-files", [])
    if conffiles:
        (debian / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    # Conffiles have their own checksums in dpkg's database (as dh_md5sums).
    sums = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if f"/{rel}" not in conffiles:
            sums.append(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {rel}\n")
    (debian / "md5sums").write_text("".join(sums))
    if "maintainer-scripts" in meta:
        scripts = crate_dir / meta["maintainer-scripts"]
        for script in ("preinst", "postinst", "prerm", "postrm", "config", "templates"):
            if (scripts / script).is_file():
                shutil.copyfile(scripts / script, debian / script)
                os.chmod(debian / script, 0o644 if script == "templates" else 0o755)
    for f in ("control", "conffiles", "md5sums"):
        if (debian / f).exists():
            os.chmod(debian / f, 0o644)
    set_times(root, args.epoch)

    built = work / f"{name}_{version}_{arch}.deb"
    run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "-z1" if args.fast else "-z6", "--build", root, built],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(args.epoch)},
    )
    return publish(built, args.out)


def publish(built, out_dir):
    """Moves a finished package into out_dir; a failed build leaves nothing
    there and a reader never sees half a file."""
    partial = out_dir / f".{built.name}.partial"
    shutil.move(built, partial)
    final = out_dir / built.name
    os.replace(partial, final)
    return final


def build_rpm(pkg, args, work):
    meta = pkg["metadata"]["generate-rpm"]
    crate_dir = Path(pkg["manifest_path"]).parent
    name = meta.get("name", pkg["name"])
    version, release = pkg["version"], "1"
    if args.version:
        version, _, release = args.version.partition("-")
        release = release or "1"
    tree = work / "tree"
    files = []
    for asset in meta["assets"]:
        src, _ = asset_source(crate_dir, args.bin_dir, asset["source"])
        mode = int(asset.get("mode", "644"), 8)
        # cargo-generate-rpm packaged the binaries unstripped; so does this.
        stage_file(src, tree / asset["dest"].lstrip("/"), mode, strip=False, allow_link=True)
        attrs = f"%attr({mode:o},root,root)"
        if asset.get("config") == "noreplace":
            attrs += " %config(noreplace)"
        elif asset.get("config"):
            attrs += " %config"
        if asset.get("doc"):
            attrs += " %doc"
        files.append(f"{attrs} {asset['dest']}")
    requires = [n if v.strip() == "*" else f"{n} {v}" for n, v in meta.get("requires", {}).items()]

    scripts = []
    for key, section in (
        ("pre_install_script", "%pre"),
        ("post_install_script", "%post"),
        ("pre_uninstall_script", "%preun"),
        ("post_uninstall_script", "%postun"),
    ):
        if key in meta:
            # %% keeps rpm from expanding the scripts' own % (comments name %post).
            body = (crate_dir / meta[key]).read_text().replace("%", "%%")
            scripts.append(f"{section}\n{body}")
    summary = meta.get("summary", pkg["description"])
    spec = "\n".join(
        [
            # No brp-strip, build-id links or debuginfo: the files go in as staged.
            "%global __os_install_post %{nil}",
            "%global debug_package %{nil}",
            "%global _build_id_links none",
            f"Name: {name}",
            f"Version: {version}",
            f"Release: {release}",
            f"Summary: {summary}",
            f"License: {pkg['license']}",
            *(f"Requires: {r}" for r in requires),
            "",
            "%description",
            summary,
            "",
            "%install",
            f"cp -al {tree}/. %{{buildroot}}/",
            "",
            *scripts,
            "%files",
            *files,
            "",
        ]
    )
    spec_file = work / f"{name}.spec"
    spec_file.write_text(spec)
    payload = "w6.gzdio" if args.fast else "w19.zstdio"
    run(
        [
            "rpmbuild", "-bb", "--quiet",
            "--define", f"_topdir {work / 'rpmbuild'}",
            "--define", f"_rpmdir {work / 'out'}",
            "--define", "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
            "--define", f"_binary_payload {payload}",
            spec_file,
        ]
    )
    arch = run(["rpm", "--eval", "%{_arch}"]).strip()
    return publish(work / "out" / f"{name}-{version}-{release}.{arch}.rpm", args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=["deb", "rpm"])
    parser.add_argument("package", help="Cargo package name")
    parser.add_argument("--bin-dir", type=Path, required=True, help="the profile's binaries")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--epoch", type=int, required=True, help="mtime of the .deb's files")
    args = parser.parse_args()
    workspace = Path(__file__).resolve().parent.parent
    try:
        pkg = crate_metadata(workspace, args.package)
        build = build_deb if args.format == "deb" else build_rpm
        print(build(pkg, args, args.work))
    except (PackagingError, OSError, KeyError) as e:
        print(f"packaging/build: {args.package} .{args.format}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
