"""Child process of `rvc_lora.pipeline.index.probe_index_file`: read one untrusted `.index` under an
address-space limit. Arguments: PATH DIM (0: any) BUDGET_BYTES [MAX_LOADED_BYTES (0: any)]; prints JSON
`{"ntotal", "dim"}`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rvc_lora.errors import IndexFileError
from rvc_lora.pipeline.index import PROBE_OUT_OF_MEMORY, PROBE_REFUSED, RetrievalIndex, faiss_module


def _limit_address_space(budget: int) -> None:
    """Cap the address space at what is mapped now (interpreter, torch, faiss) plus `budget` bytes."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + budget, mapped + budget))
    except (ImportError, OSError, ValueError):
        pass  # no rlimits or /proc here: from_path's file-size check still applies


def main(argv: list[str]) -> int:
    path, dim, budget = Path(argv[0]), int(argv[1]), int(argv[2])
    max_bytes = int(argv[3]) if len(argv) > 3 and int(argv[3]) > 0 else None
    faiss_module()  # imported before the cap: its libraries' mappings are not the file's doing
    _limit_address_space(budget)
    try:
        loaded = RetrievalIndex.from_path(path, dim=dim or None, max_bytes=max_bytes)
    except IndexFileError as e:
        sys.stderr.write(f"{e}\n")
        return PROBE_REFUSED
    except MemoryError:
        return PROBE_OUT_OF_MEMORY
    sys.stdout.write(json.dumps({"ntotal": loaded.ntotal, "dim": loaded.dim}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
