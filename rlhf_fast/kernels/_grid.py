"""Launch-shape decisions shared by the Triton op families."""

from __future__ import annotations

import torch

SPLIT_MIN_TILES = 8  # a row of this many tiles, or more, may be spread over programs


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def few_long_rows(rows: int, tiles: int, device: torch.device) -> bool:
    """Whether one program per row would leave most of the GPU idle — fewer rows than a
    quarter of the SMs — while each row is long (``tiles`` tiles, at least SPLIT_MIN_TILES):
    then the kernels spread each row over several programs. Never on the CPU (interpreter)."""
    if tiles < SPLIT_MIN_TILES or device.type != "cuda":
        return False
    return rows * 4 <= sm_count(device)
