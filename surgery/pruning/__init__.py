"""The pruning pipeline, rank -> allocate -> cut -> recover (:mod:`.prune`): the channel-dependency
graph with Torch-Pruning's fixes for detectors (:mod:`.graph`, :mod:`.index_maps`), importance
criteria (:mod:`.importance`, :mod:`.calibrate`), allocators that turn a budget into per-group
channel counts (:mod:`.allocate`, :mod:`.target`, :mod:`.latency`, :mod:`.sensitivity`), the cut
(:mod:`.cut`), recovery without retraining (:mod:`.recover`), the typed plan a checkpoint records
(:mod:`.plan`), the masked baseline (:mod:`.masked`) and prune-aware sparse training (:mod:`.sparsify`)."""
