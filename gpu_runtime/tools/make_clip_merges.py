"""Generate ``gpu_runtime/data/clip_merges.txt``: the 48,894 BPE merges of OpenAI's CLIP tokenizer.

Why: the worker must build the real CLIP tokenizer (``vocab.json`` + ``merges.txt`` of
``openai/clip-vit-large-patch14``, 49,408 tokens) without the Hugging Face hub. Both files derive
deterministically from the merges list, so the repository ships only that list (~0.5 MB) and
``gpu_runtime.families`` rebuilds the tokenizer files from it at materialize time.

The source is ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel (MIT)::

    pip download --no-deps open_clip_torch -d /tmp/ocw
    unzip -o /tmp/ocw/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/ocw
    python gpu_runtime/tools/make_clip_merges.py /tmp/ocw/open_clip/bpe_simple_vocab_16e6.txt.gz

It takes the same slice as CLIP's ``SimpleTokenizer``: line 0 is a header, then the first
``49152 - 256 - 2`` merges (the vocabulary is 256 byte characters, the same with ``</w>``, one token per merge
and two special tokens = 49,408).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

# CLIP's SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
MERGES_COUNT = 49152 - 256 - 2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "clip_merges.txt"


def extract_merges(bpe_gz: Path) -> list[str]:
    """Return CLIP's merges (``"a b"`` lines) from open_clip's gzipped BPE file, checking the count."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : MERGES_COUNT + 1]
    if len(merges) != MERGES_COUNT or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} does not look like CLIP's bpe_simple_vocab_16e6.txt.gz")
    return merges


def main(argv: list[str] | None = None) -> int:
    """Write the merges file (one merge per line, UTF-8, no header) and print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path of open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    merges = extract_merges(args.bpe_gz)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(merges)} merges to {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
