"""The ring protocol: the shared folder's files (:mod:`.layout`), the exchange of weights through them
with locks and heartbeats (:mod:`.exchange`), and the per-epoch grafting step (:mod:`.grafter`)."""
