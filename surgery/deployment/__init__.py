"""Deployment: ONNX export (:mod:`.export`), every ONNX Runtime session and the file's metadata
(:mod:`.onnx_io`), INT8 post-training quantization (:mod:`.quantize`), runtimes that call an
exported detector like a torchvision one (:mod:`.runtime`), detections on image files
(:mod:`.predict`) and the float-vs-INT8 deployment table (:mod:`.table`)."""
