"""A helper the moment-based map metrics share."""

from __future__ import annotations

import torch


def normalised(block: torch.Tensor, diag_rows: torch.Tensor,
               diag_cols: torch.Tensor) -> torch.Tensor:
    """``block / sqrt(outer(diag_rows, diag_cols))`` as a new tensor, NaN where that root is 0.

    On the CPU, when no product can be 0 (checked on the smallest of each side: rounding is
    monotone) it takes three passes over the matrix instead of six. On a GPU that check would
    make the host wait for the device, and the passes are cheap there, so it is skipped.
    """
    denom = torch.outer(diag_rows, diag_cols)
    if (denom.device.type == "cpu" and len(diag_rows) and len(diag_cols)
            and float(diag_rows.min() * diag_cols.min()) > 0):
        return block / denom.sqrt_()
    denom.sqrt_()
    live = denom > 0
    return torch.where(live, block / torch.where(live, denom, 1.0), torch.nan)
