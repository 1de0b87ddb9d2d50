"""Print shell exports of the fastest MXFP4 GEMV tiles a bench_mxfp4_gemv.py --json file found, for the glu and down
shapes (GIANTS_MXFP4_GEMV_GLU, GIANTS_MXFP4_GEMV), so a decode benchmark in the same call runs with them:

    eval "$(python benchmarks/pick_mxfp4_tiles.py gemv.json)"
"""

from __future__ import annotations

import json
import shlex
import sys

KEYS = ("block_n", "block_k", "num_warps", "num_stages", "prefetch", "decode")


def main() -> None:
    res = json.load(open(sys.argv[1]))
    for shape, var in (("down", "GIANTS_MXFP4_GEMV"), ("glu", "GIANTS_MXFP4_GEMV_GLU")):
        best = (res["shapes"].get(shape) or {}).get("best")
        if best:
            print(f"export {var}={shlex.quote(json.dumps({k: best[k] for k in KEYS if k in best}))}")


if __name__ == "__main__":
    main()
