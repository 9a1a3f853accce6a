"""Filter grafting for deep neural networks (Meng et al., CVPR 2020; Cheng, Meng et al. 2020).

Several networks train in parallel, one process each. After every epoch each network saves its
weights to a shared folder, reads its ring predecessor's weights of the same epoch and grafts them
in: each layer becomes ``alpha * own + (1 - alpha) * peer``, where ``alpha`` favours the network
whose layer holds more information (the entropy of its weight histogram). Grafting reactivates
filters that training left nearly zero ("invalid" filters) and raises accuracy.

In your own training loop::

    from grafting import Grafter
    with Grafter("runs/shared", net=i, num=2) as grafter:   # one process per network
        for epoch in range(1, epochs + 1):
            train_one_epoch(model, ...)
            report = grafter.step(model, epoch)             # save, wait for the peer, graft
            print(report.summary())

The pieces, for use on their own:

- ``layer_entropy(w)`` / ``graft_coefficient(h_self, h_peer, a, c)``: the information measure and
  the arctan weighting.
- ``graft_layers(model, peer_state, rule=...)`` / ``graft_filters(model, peer_state)``: grafting a
  peer's state_dict into a model in place, per layer or per filter.
- ``count_invalid_filters(state_dict, threshold)``: the paper's invalid-filter count.
- ``load_state_dict_file(path)``: a state_dict from any common checkpoint layout.
- ``Exchange``: the shared folder (atomic files, waiting, locking) under ``Grafter``.
- ``grafting.distill``: distillation losses and teachers (cultivation); ``grafting.ablation``: the
  paper's noise, internal and averaging alternatives; ``grafting.tools``: invalid-filter tables,
  ensembles and results summaries.

Training scripts: ``graft-cifar`` (grafting_cifar/train.py) and ``graft-imagenet``
(grafting_imagenet/train.py); see the README.
"""
from .checkpoint import extract_state_dict, load_file, load_state_dict_file, save_atomic
from .entropy import layer_entropies, layer_entropy, layer_l1
from .errors import (CheckpointError, DatasetNotFoundError, GraftingError, LockError, PeerMismatchError,
                     PeerTimeoutError, UsageError)
from .exchange import Exchange
from .filters import count_invalid_filters
from .graft import FilterRecord, LayerRecord, default_rule, graft_filters, graft_layers
from .grafter import Grafter, GraftReport
from .weighting import graft_coefficient


__all__ = [
    "Grafter", "GraftReport", "Exchange",
    "layer_entropy", "layer_entropies", "layer_l1", "graft_coefficient",
    "graft_layers", "graft_filters", "default_rule", "LayerRecord", "FilterRecord",
    "count_invalid_filters", "load_state_dict_file", "extract_state_dict", "load_file", "save_atomic",
    "GraftingError", "UsageError", "CheckpointError", "DatasetNotFoundError", "LockError",
    "PeerMismatchError", "PeerTimeoutError",
]
