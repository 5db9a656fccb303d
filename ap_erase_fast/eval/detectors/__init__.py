"""Image-level detectors of ``ap-erase eval``: each loads from local files only.

| name       | what it measures                                    | files (under ``--weights DIR``)              |
|------------|-----------------------------------------------------|----------------------------------------------|
| ``nudenet``  | NudeNet exposed-body-part detections → NER-t       | none: the detector ships in the nudenet wheel |
| ``resnet50`` | ImageNet top-1/top-5 → ESR/PSR                      | ``resnet50/`` (transformers ResNet folder)    |
| ``clip``     | CLIP score of each image with its prompt            | ``clip/`` (transformers CLIPModel folder)     |
| ``lpips``    | LPIPS(base image, erased image), same prompt & seed | ``lpips/alexnet.pth`` + ``lpips/alex.pth``   |
| ``shapes``   | ShapesWorld classifier → ESR/PSR of shapes, colours | none: ships with ``--model shapes``          |
"""
from __future__ import annotations

DETECTORS = ("nudenet", "resnet50", "clip", "lpips", "shapes", "shapes2")


def load_detector(name: str, weights_dir: str, device: str, options: dict):
    """Build the named detector; raises UserError when its files are missing."""
    if name == "nudenet":
        from .nudenet import NudeNetDetector

        return NudeNetDetector(model_path=options.get("nudenet_model"),
                               classes=options.get("nudenet_classes"))
    if name == "resnet50":
        from .classifier import ResNetClassifier

        return ResNetClassifier(weights_dir, device)
    if name == "clip":
        from .clip_score import ClipScorer

        return ClipScorer(weights_dir, device)
    if name == "lpips":
        from .lpips import LPIPSMetric

        return LPIPSMetric(weights_dir, device)
    if name in ("shapes", "shapes2"):
        from .shapes import ShapesClassifier

        return ShapesClassifier(device, model=name)
    raise ValueError(name)
