"""Filter grafting for deep neural networks (Meng et al., CVPR 2020; Cheng, Meng et al. 2020).

Several networks train in parallel, one process each. After every epoch each network saves its
weights to a shared folder, reads its ring predecessor's weights of the same epoch and grafts them
in: each layer becomes ``alpha * own + (1 - alpha) * peer``, where ``alpha`` favours the network
whose layer holds more information (the entropy of its weight histogram). Grafting reactivates
filters that training left nearly zero ("invalid" filters) and raises accuracy.

In your own training loop (docs/examples/own_loop.py is the whole pattern)::

    from grafting import Grafter
    with Grafter("runs/r1", net=i, num=2, model=model) as grafter:   # a new folder per run, one process per network
        for epoch in range(1, epochs + 1):
            train_one_epoch(model, ...)
            if epoch < epochs:                                    # the last epoch's weights are the result
                print(grafter.step(model, epoch).summary())       # save, wait for the peer, graft
        grafter.finish()                                          # the run is complete: clean the folder

In PyTorch Lightning: ``grafting.lightning.GraftingCallback`` (``pip install '.[lightning]'``).

The pieces, for use on their own:

- ``layer_entropy(w)`` / ``graft_coefficient(h_self, h_peer, a, c)``: the information measure and
  the arctan weighting.
- ``graft_layers(model, peer_state, rule=...)`` / ``graft_filters(model, peer_state)``: grafting a
  peer's state_dict into a model in place, per layer or per filter.
- ``count_invalid_filters(state_dict, threshold)``: the paper's invalid-filter count.
- ``load_state_dict_file(path)``: a state_dict from any common checkpoint layout.
- ``Exchange``: the shared folder (atomic files, waiting, locking) under ``Grafter``.
- ``Wording``: how messages name the settings (the library's arguments by default).

The layers of the package:

- ``grafting.method``: the numerics of docs/METHOD.md (entropy, weighting, grafting, invalid filters,
  the paper's ablations, distillation);
- ``grafting.ring``: the ring protocol (the shared folder's files, the exchange, the ``Grafter``);
- ``grafting.train``: the run machinery of the training scripts (configuration, loop, checkpoints);
- ``grafting.tools``: results next to the paper (``graft-summary``, ``graft-filters``, ``graft-ensemble``);
- ``grafting.data``: CIFAR and ImageNet pipelines and their generated stand-ins;
- ``grafting.archs``: the CIFAR architectures of the repository's ``models/`` folder.

Training scripts: ``graft-cifar`` (grafting_cifar/train.py) and ``graft-imagenet``
(grafting_imagenet/train.py); see docs/library.md.
"""

from grafting.checkpoint import extract_state_dict, load_file, load_state_dict_file, save_atomic
from grafting.errors import (
    CheckpointError,
    DatasetNotFoundError,
    GraftingError,
    LockError,
    PeerMismatchError,
    PeerTimeoutError,
    UsageError,
    Wording,
)
from grafting.method.entropy import layer_entropies, layer_entropy, layer_l1
from grafting.method.filters import count_invalid_filters
from grafting.method.graft import FilterRecord, LayerRecord, default_rule, graft_filters, graft_layers
from grafting.method.weighting import graft_coefficient
from grafting.ring.exchange import Exchange
from grafting.ring.grafter import Grafter, GraftReport

__all__ = [
    "Grafter",
    "GraftReport",
    "Exchange",
    "layer_entropy",
    "layer_entropies",
    "layer_l1",
    "graft_coefficient",
    "graft_layers",
    "graft_filters",
    "default_rule",
    "LayerRecord",
    "FilterRecord",
    "count_invalid_filters",
    "load_state_dict_file",
    "extract_state_dict",
    "load_file",
    "save_atomic",
    "GraftingError",
    "UsageError",
    "Wording",
    "CheckpointError",
    "DatasetNotFoundError",
    "LockError",
    "PeerMismatchError",
    "PeerTimeoutError",
]
