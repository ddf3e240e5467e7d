"""Install visdom's browser assets from the npm registry, so that ``python -m visdom.server``
starts and serves a working page without internet access.

    python visdom_assets.py [--force] [--npm PATH]

visdom 0.2.4 downloads ~30 scripts, styles and fonts from CDNs at every server start and crashes
when it cannot. Every one of them is published on the npm registry: this command fetches the
packages with ``npm pack`` (no install, no scripts run), copies the files under the names
visdom expects into the installed visdom package, and writes ``static/version.built`` so that
visdom no longer tries to download. It is idempotent and says what it did. Users with internet
access need not run it.
"""
import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MATHJAX = ["MathJax.js", "config/Safe.js", "config/TeX-AMS-MML_HTMLorMML.js", "extensions/Safe.js",
           "jax/output/SVG/config.js", "jax/output/SVG/jax.js",
           "jax/output/SVG/fonts/TeX/fontdata.js", "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js"]
GLYPHICONS = "glyphicons-halflings-regular"
# npm package -> {file in the package: file under visdom/static}; names from visdom/server/build.py
ASSETS = {
    "jquery@3.1.1": {"dist/jquery.min.js": "js/jquery.min.js"},
    "bootstrap@3.3.7": {
        "dist/js/bootstrap.min.js": "js/bootstrap.min.js",
        "dist/css/bootstrap.min.css": "css/bootstrap.min.css",
        **{f"dist/fonts/{GLYPHICONS}.{ext}": f"fonts/{GLYPHICONS}.{ext}"
           for ext in ("eot", "woff2", "woff", "ttf")},
        f"dist/fonts/{GLYPHICONS}.svg": f"fonts/{GLYPHICONS}.svg#glyphicons_halflingsregular",
    },
    "react@16.2.0": {"umd/react.production.min.js": "js/react-react.min.js"},
    "react-dom@16.2.0": {"umd/react-dom.production.min.js": "js/react-dom.min.js"},
    "react-modal@3.1.10": {"dist/react-modal.min.js": "js/react-modal.min.js"},
    "plotly.js-dist-min@2.11.1": {"plotly.min.js": "js/plotly-plotly.min.js"},
    "sjcl@1.0.7": {"sjcl.js": "js/sjcl.js"},
    "layout-bin-packer@1.4.0": {"dist/layout-bin-packer.js": "js/layout_bin_packer.js",
                                "dist/layout-bin-packer.js.map": "js/layout-bin-packer.js.map"},
    "d3@3.5.17": {"d3.min.js": "js/d3.v3.min.js"},
    "d3-selection-multi@1.0.1": {"build/d3-selection-multi.js": "js/d3-selection-multi.v1.js"},
    "save-svg-as-png@1.4.17": {"lib/saveSvgAsPng.js": "js/saveSvgAsPng.js"},
    "react-resizable@1.4.6": {"css/styles.css": "css/react-resizable-styles.css"},
    "react-grid-layout@0.16.3": {"css/styles.css": "css/react-grid-layout-styles.css"},
    "classnames@2.2.5": {"index.js": "fonts/classnames"},
    "mathjax@2.7.5": {path: f"js/mathjax/2.7.5/{path}" for path in MATHJAX},
}


class AssetError(RuntimeError):
    pass


def visdom_static_dir():
    spec = importlib.util.find_spec("visdom")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("visdom is not installed in this Python; install the requirements first "
                         "(see the README)")
    return Path(spec.submodule_search_locations[0]) / "static"


def visdom_version(static):
    version_file = static.parent / "VERSION"
    return version_file.read_text().strip() if version_file.exists() else "no_version_file"


def missing_assets(static):
    return [(package, source, target) for package, files in ASSETS.items()
            for source, target in files.items() if not (static / target).is_file()]


def assets_installed(static=None):
    """True when visdom can start offline: every asset present and version.built current."""
    try:
        static = static or visdom_static_dir()
    except AssetError:
        return False
    built = static / "version.built"
    return (not missing_assets(static) and built.is_file()
            and built.read_text().strip() == visdom_version(static))


def npm_pack(npm, package, folder):
    """Download one package tarball from the npm registry into ``folder``; return its path."""
    result = subprocess.run([npm, "pack", package, "--json", "--pack-destination", str(folder)],
                            capture_output=True, text=True, cwd=folder)
    if result.returncode != 0:
        raise AssetError(f"npm pack {package} failed:\n{result.stderr.strip()}")
    return Path(folder) / json.loads(result.stdout)[0]["filename"]


def install(npm="npm", force=False, log=print):
    static = visdom_static_dir()
    if not force and assets_installed(static):
        log(f"visdom browser assets already installed in {static}: nothing to do")
        return 0
    npm_path = shutil.which(npm)
    if npm_path is None:
        raise AssetError(f"'{npm}' not found. Install Node.js and npm (e.g. 'apt-get install npm') "
                         f"or pass --npm PATH; with internet access visdom downloads these files "
                         f"itself and this step is not needed.")
    todo = ASSETS if force else {p: f for p, f in ASSETS.items()
                                 if any(p == m[0] for m in missing_assets(static))}
    copied = 0
    with tempfile.TemporaryDirectory() as tmp:
        for package, files in todo.items():
            tarball = npm_pack(npm_path, package, tmp)
            with tarfile.open(tarball) as archive:
                for source, target in files.items():
                    member = archive.extractfile(f"package/{source}")
                    if member is None:
                        raise AssetError(f"{package} has no file {source}")
                    destination = static / target
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(member.read())
                    copied += 1
            log(f"  {package}: {len(files)} file(s)")
    user_style = static.parent / "user" / "style.css"  # index.html links it; visdom ships none
    if not user_style.exists():
        user_style.parent.mkdir(exist_ok=True)
        user_style.write_text("")
    (static / "version.built").write_text(visdom_version(static))
    log(f"installed {copied} visdom browser asset(s) from the npm registry into {static}; "
        f"'python -m visdom.server' now starts without internet access")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="reinstall every asset")
    parser.add_argument("--npm", default="npm", help="npm executable")
    args = parser.parse_args(argv)
    try:
        return install(args.npm, args.force)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
