"""What can be pruned: the model registry (every torchvision detection builder, the project's own
compact builders, ``scheme:reference`` models such as ``ultralytics:yolov8n.yaml``), the
:class:`ModelSpec` a checkpoint records to rebuild a model, anchor surgery (whole anchor shapes
removed with their head channels) and the post-processing that keeps one-stage detectors fast."""
