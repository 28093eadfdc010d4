"""CI check of `interp lens` output: the target token is the top-1 token at the final layer.

    python .ci/check_lens_output.py LOG TARGET

The printed table shows tokens quoted as Python literals (' Paris'); the final layer's row is
labelled final_post, and its first quoted token is the top-1.
"""

import ast
import re
import sys

QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")


def top1_at_final_layer(text: str) -> str:
    rows = [line for line in text.splitlines() if re.search(r"\bfinal_post\b", line)]
    if not rows:
        raise SystemExit("check_lens_output: no final_post row in the lens output")
    tokens = QUOTED.findall(rows[-1])
    if not tokens:
        raise SystemExit(f"check_lens_output: no quoted token in the final row: {rows[-1]!r}")
    return ast.literal_eval(tokens[0])


if __name__ == "__main__":
    log, target = sys.argv[1], sys.argv[2]
    top1 = top1_at_final_layer(open(log).read())
    if top1 != target:
        raise SystemExit(f"check_lens_output: top-1 at the final layer is {top1!r}, expected {target!r}")
    print(f"check_lens_output: ok, {target!r} is the top-1 token at the final layer")
