"""Contiguous layer partitions: stage i owns layers [bounds[i], bounds[i + 1]).

A partition is a tuple of pp_size + 1 increasing boundaries from 0 to num_layers; every stage
owns at least one layer. Moving a boundary by one moves one layer between adjacent stages.
"""

from __future__ import annotations

Bounds = tuple[int, ...]


def even_bounds(num_layers: int, pp_size: int) -> Bounds:
    """SGLang's static split: equal shares, leftovers to the last stages."""
    check_sizes(num_layers, pp_size)
    base, extra = divmod(num_layers, pp_size)
    counts = [base + (1 if i >= pp_size - extra else 0) for i in range(pp_size)]
    return bounds_from_counts(counts)


def bounds_from_counts(counts: list[int] | tuple[int, ...]) -> Bounds:
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return tuple(out)


def counts_of(bounds: Bounds) -> list[int]:
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def check_sizes(num_layers: int, pp_size: int) -> None:
    if pp_size < 1:
        raise ValueError(f"pp_size: must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise ValueError(
            f"pp_size: {pp_size} stages need at least as many layers, got {num_layers}"
        )


def parse_partition(text: str, num_layers: int, pp_size: int) -> Bounds:
    """`"3,1"` (layer counts per stage, SGLANG_PP_LAYER_PARTITION's form) -> bounds."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"pp_partition: expected comma-separated layer counts, got {text!r}"
        ) from None
    if len(counts) != pp_size or min(counts) < 1 or sum(counts) != num_layers:
        raise ValueError(
            f"pp_partition: {text!r} must give {pp_size} counts >= 1 summing to {num_layers}"
        )
    return bounds_from_counts(counts)


def owner_of(bounds: Bounds, layer: int) -> int:
    for stage in range(len(bounds) - 1):
        if bounds[stage] <= layer < bounds[stage + 1]:
            return stage
    raise ValueError(f"layer {layer} is outside the partition {bounds}")


def single_moves(current: Bounds, target: Bounds) -> list[tuple[int, int, int]]:
    """One-layer moves (layer, src stage, dst stage) between adjacent stages that turn `current`
    into `target`, each keeping every stage non-empty on the way."""
    if len(current) != len(target) or current[0] != target[0] or current[-1] != target[-1]:
        raise ValueError(f"partitions {current} and {target} do not match")
    bounds = list(current)
    moves: list[tuple[int, int, int]] = []
    while tuple(bounds) != tuple(target):
        progressed = False
        for j in range(1, len(bounds) - 1):
            if bounds[j] < target[j] and bounds[j] + 1 < bounds[j + 1]:
                moves.append((bounds[j], j, j - 1))  # stage j's first layer goes upstream
                bounds[j] += 1
                progressed = True
            elif bounds[j] > target[j] and bounds[j] - 1 > bounds[j - 1]:
                moves.append((bounds[j] - 1, j - 1, j))  # stage j-1's last layer goes downstream
                bounds[j] -= 1
                progressed = True
        if not progressed:
            raise AssertionError(f"no progress moving {current} -> {target}")
    return moves
