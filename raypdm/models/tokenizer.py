"""A tiny, offline CLIP tokenizer for the `tiny` presets, and hub-compatible tokenizer saving.

No tokenizer can be downloaded here, so tests and the demo use a byte-level BPE vocabulary of ~530
entries: every one of CLIP's 256 byte-level symbols with and without the end-of-word marker `</w>`, a
handful of merges (enough that the prompts the method uses come out as whole words) and the two CLIP
special tokens, placed last as in the real 49,408-entry vocabulary.

transformers 5 trap: `CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a broken
3-token tokenizer, so the files are written to a folder and read back with `from_pretrained`.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a tokenizer is built: the registry's specs must stay cheap to import
    from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Merges make the words of the method's prompts single tokens, so tests see realistic token counts.
_TINY_MERGES = (
    "p h", "o t", "ph ot", "phot o</w>",
    "o f</w>",
    "s k", "sk s</w>",
    "p e", "r s", "pe rs", "o n</w>", "pers on</w>",
    "n o", "no i", "noi s", "nois y</w>",
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """CLIP/GPT-2's reversible byte -> printable-unicode symbols, in CLIP's vocabulary order."""
    byte_ids = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = byte_ids[:]
    shifted = 0
    for b in range(256):
        if b not in byte_ids:  # whitespace/control bytes are shifted past 255 to stay printable
            byte_ids.append(b)
            codepoints.append(256 + shifted)
            shifted += 1
    return tuple(chr(c) for c in codepoints)


def tiny_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode())
    merged = ["".join(m.split()) for m in _TINY_MERGES]
    tokens = symbols + [s + "</w>" for s in symbols] + merged + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_files(folder: str | Path, vocab: dict[str, int], merges: list[str] | tuple[str, ...]) -> Path:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` the way the SD hub repos ship them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    config.setdefault("tokenizer_class", "CLIPTokenizer")
    config.setdefault("model_max_length", MODEL_MAX_LENGTH)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A fresh tiny tokenizer (built from files in a temporary folder; nothing persists)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="raypdm-tiny-tok-") as tmp:
        write_tokenizer_files(tmp, tiny_vocab(), _TINY_MERGES)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH, local_files_only=True)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """`save_pretrained`, plus the legacy `vocab.json`/`merges.txt` the hub repos have.

    transformers 5 only writes `tokenizer.json`; writing the legacy pair too keeps a saved bundle
    byte-for-byte the same shape as an `hf download`, so one file list describes both.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    write_tokenizer_files(folder, model["vocab"], merges)
    return folder
