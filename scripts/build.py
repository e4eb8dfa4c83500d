#!/usr/bin/env python3
"""Build pyasl's libllama: fetch the pinned llama-cpp-python sdist, apply patches/, compile
llama.cpp + native/ with CMake into a cache folder outside the clone.

    python scripts/build.py                 # CPU build into $PYASL_HOME/build/cpu
    python scripts/build.py --cuda          # same code paths, CUDA backend (build/cuda)
    python scripts/build.py --metal         # Metal backend (build/metal)
    python scripts/build.py --stock         # stock libllama: the same sdist unpatched, no native/
                                            # (build/stock; what pyasl's figures are compared with)
    python scripts/build.py --print-lib-dir # where the libraries are

Re-running is incremental: the patched tree is synced file by file, so only files whose
contents changed get a new mtime and are recompiled.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyasl._paths import (  # noqa: E402
    LLAMA_CPP_PYTHON_SDIST_SHA256,
    LLAMA_CPP_PYTHON_VERSION,
    build_dir,
    cache_home,
)

SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


def log(msg: str) -> None:
    print(f"[pyasl build] {msg}", flush=True)


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] ")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\] ")


def run_quiet(cmd: list[str], logfile: Path, what: str, verbose: bool = False) -> None:
    """Run a CMake step with its output (compiler warnings included) going to logfile; show only the
    progress, and on failure the end of the log. verbose: stream everything as it comes."""
    if verbose:
        subprocess.run(cmd, check=True)
        return
    tty = sys.stdout.isatty()
    shown = -1  # tens of percent already logged
    on_line = False  # a \r progress line is open on the terminal
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            m = _NINJA_STEP.match(line)
            pct = (100 * int(m.group(1)) // max(1, int(m.group(2)))) if m else None
            if pct is None:
                m = _MAKE_STEP.match(line)
                pct = int(m.group(1)) if m else None
            if pct is None:
                continue
            if tty:
                print(f"\r[pyasl build] {what} {pct:3d}%", end="", flush=True)
                on_line = True
            elif pct // 10 > shown:  # a log file: one line per 10%
                shown = pct // 10
                log(f"{what} {pct}%")
        rc = proc.wait()
    if on_line:
        print()
    if rc != 0:
        lines = logfile.read_text(errors="replace").splitlines()
        sys.stderr.write("\n".join(lines[-200:]) + "\n")
        raise SystemExit(f"[pyasl build] {what} failed (exit {rc}); the last 200 lines are above, "
                         f"the whole log is {logfile}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist() -> Path:
    dl = cache_home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / SDIST_NAME
    if path.exists() and sha256_file(path) == LLAMA_CPP_PYTHON_SDIST_SHA256:
        return path
    if path.exists():
        log(f"{path} has the wrong sha256, fetching again")
        path.unlink()
    log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist")
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        # --no-build-isolation: metadata comes from the installed scikit-build-core instead of
        # building cmake from source under --no-binary :all:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--no-build-isolation", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
            check=True,
        )
        got = Path(tmp) / SDIST_NAME
        digest = sha256_file(got)
        if digest != LLAMA_CPP_PYTHON_SDIST_SHA256:
            raise SystemExit(f"sha256 mismatch for {SDIST_NAME}: {digest}")
        shutil.move(str(got), path)
    return path


def patch_files() -> list[Path]:
    return sorted((ROOT / "patches").glob("*.patch"))


def tree_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def extract_and_patch(sdist: Path, dest: Path, patches: bool = True) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                if m.name:
                    members.append(m)
        tar.extractall(dest, members=members, filter="data")
    for p in patch_files() if patches else []:
        check = subprocess.run(["patch", "-p1", "--dry-run", "-N", "-s", "-i", str(p)], cwd=dest,
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"patch {p.name} does not apply cleanly to llama.cpp from "
                             f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}:\n{check.stdout}{check.stderr}")
        subprocess.run(["patch", "-p1", "-N", "-s", "-i", str(p)], cwd=dest, check=True)
        log(f"applied {p.name}")


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst equal src, touching only files whose bytes differ. Returns files changed."""
    changed = 0
    src_files = {p.relative_to(src) for p in src.rglob("*") if p.is_file()}
    if dst.exists():
        for p in list(dst.rglob("*")):
            if p.is_file() and p.relative_to(dst) not in src_files:
                p.unlink()
                changed += 1
    for rel in sorted(src_files):
        s, d = src / rel, dst / rel
        data = s.read_bytes()
        if d.exists() and d.read_bytes() == data:
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(data)
        shutil.copymode(s, d)
        changed += 1
    return changed


def prepare_source() -> Path:
    sdist = fetch_sdist()
    src = cache_home() / "src" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = src.parent / (src.name + ".patches")
    digest = tree_digest(patch_files())
    if src.exists() and stamp.exists() and stamp.read_text() == digest:
        return src
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        extract_and_patch(sdist, Path(tmp))
        n = sync_tree(Path(tmp), src)
    stamp.write_text(digest)
    log(f"source ready at {src} ({n} files updated)")
    return src


def prepare_stock_source() -> Path:
    """The sdist's llama.cpp as llama-cpp-python builds it: no patches/, no native/."""
    sdist = fetch_sdist()
    src = cache_home() / "src" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-stock"
    if (src / "CMakeLists.txt").exists():
        return src
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        extract_and_patch(sdist, Path(tmp), patches=False)
        sync_tree(Path(tmp), src)
    log(f"stock source ready at {src}")
    return src


def build_stock(jobs: int, verbose: bool) -> None:
    """libllama and ggml from the unpatched sdist into build/stock/bin (configured as llama-cpp-python's
    own build: shared libraries, no tools, examples or tests)."""
    src = prepare_stock_source()
    out = build_dir("stock")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "CMakeCache.txt").exists():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        args = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_CURL=OFF", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out / 'bin'}",
                f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={out / 'bin'}"]
        log(f"configuring {out}")
        run_quiet(["cmake", "-S", str(src), "-B", str(out), *gen, *args], out / "pyasl-configure.log", "configure",
                  verbose)
    log(f"compiling stock libllama with {jobs} jobs")
    run_quiet(["cmake", "--build", str(out), "--target", "llama", "-j", str(jobs)], out / "pyasl-build.log",
              "compiling", verbose)
    log(f"libraries in {out / 'bin'}")


def prepare_cmake_tree() -> Path:
    """Copy CMakeLists.txt and native/ to a fixed folder in the cache, so that one build folder
    serves every clone (CI clones land at new paths) and only changed files recompile."""
    top = cache_home() / "src" / "pyasl-cmake"
    top.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=top.parent) as tmp:
        stage = Path(tmp)
        shutil.copy2(ROOT / "CMakeLists.txt", stage / "CMakeLists.txt")
        shutil.copytree(ROOT / "native", stage / "native")
        sync_tree(stage, top)
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON")
    g.add_argument("--metal", action="store_true", help="build with -DGGML_METAL=ON")
    g.add_argument("--stock", action="store_true",
                   help="build the stock libllama of the same sdist (no patches, no native/) into build/stock")
    ap.add_argument("--variant", help="build folder name (default: cpu, cuda or metal)")
    ap.add_argument("--debug", action="store_true", help="CMAKE_BUILD_TYPE=RelWithDebInfo")
    ap.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UBSan build")
    ap.add_argument("--cmake-arg", action="append", default=[], help="extra -D argument for CMake")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--source-only", action="store_true", help="fetch and patch, do not compile")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show CMake's and the compiler's output as it comes (default: progress only, the log "
                         "in <build folder>/pyasl-build.log, shown when the build fails)")
    ap.add_argument("--print-lib-dir", action="store_true", help="print the library folder and exit")
    ap.add_argument("--print-sdist", action="store_true",
                    help="fetch (if needed) and print the llama-cpp-python sdist path, then exit")
    args = ap.parse_args()
    if args.print_sdist:
        print(fetch_sdist())
        return

    if args.stock:
        if args.print_lib_dir:
            print(build_dir("stock") / "bin")
        else:
            build_stock(args.jobs, args.verbose)
        return
    backend = "cuda" if args.cuda else "metal" if args.metal else "cpu"
    variant = args.variant or (backend + ("-asan" if args.sanitize else ""))
    out = build_dir(variant)
    if args.print_lib_dir:
        print(out / "bin")
        return

    src = prepare_source()
    top = prepare_cmake_tree()
    if args.source_only:
        print(src)
        return

    cmake_args = [
        f"-DPYASL_LLAMA_SRC={src}",
        f"-DCMAKE_BUILD_TYPE={'RelWithDebInfo' if args.debug or args.sanitize else 'Release'}",
    ]
    if args.cuda:
        cmake_args.append("-DGGML_CUDA=ON")
    if args.metal:
        cmake_args.append("-DGGML_METAL=ON")
    if args.sanitize:
        cmake_args += ["-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON", "-DGGML_NATIVE=OFF",
                       "-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON"]
    cmake_args += [a if a.startswith("-D") else "-D" + a for a in args.cmake_arg]

    out.mkdir(parents=True, exist_ok=True)
    args_file = out / "pyasl-cmake-args.json"
    cache_file = out / "CMakeCache.txt"
    if cache_file.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={top}" not in cache_file.read_text():
        log(f"{out} was configured from another source folder; starting it afresh")
        shutil.rmtree(out)
        out.mkdir(parents=True)
    if not cache_file.exists() or not args_file.exists() \
            or json.loads(args_file.read_text()) != cmake_args:
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        log(f"configuring {out}")
        run_quiet(["cmake", "-S", str(top), "-B", str(out), *gen, *cmake_args], out / "pyasl-configure.log",
                  "configure", args.verbose)
        args_file.write_text(json.dumps(cmake_args))
    log(f"compiling with {args.jobs} jobs")
    run_quiet(["cmake", "--build", str(out), "--target", "pyasl_native", "-j", str(args.jobs)],
              out / "pyasl-build.log", "compiling", args.verbose)
    libdir = out / "bin"
    (out / "pyasl-build.json").write_text(json.dumps({
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "patches": tree_digest(patch_files()),
        "native": tree_digest(sorted((ROOT / "native").glob("*"))),
        "backend": backend,
        "cmake_args": cmake_args,
    }, indent=1))
    log(f"libraries in {libdir}")


if __name__ == "__main__":
    main()
