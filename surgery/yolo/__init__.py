"""The YOLO family: Ultralytics detectors as an optional extra (``ultralytics:<yaml or .pt>``,
:mod:`surgery.yolo.ultralytics_adapter`, the only module importing Ultralytics) and the project's
own YOLOv2 (``yolov2_darknet19``, :mod:`surgery.yolo.yolov2`), both in torchvision's detection
interface (:mod:`surgery.yolo.interface`)."""
