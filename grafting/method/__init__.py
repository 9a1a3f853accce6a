"""The method's numerics (docs/METHOD.md): layer information, the weighting, grafting weights in
memory, invalid filters, the paper's ablations and distillation. Nothing here touches files."""
