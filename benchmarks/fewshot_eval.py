"""``edge-eval --fewshot K``: zero-shot, few-shot and fused side by side on one pass over the test set. The memory of
each data class comes from ROOT/<class>/train/good (K images, seeded; never a test image: one whose content is also
in the test folder is left out), built and loaded exactly as ``edge-calibrate --memory`` and ``edge-detect`` do."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from clipad.runtime.decision import FUSED
from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")
VIEWS = ("zero_shot", "few_shot", "fused")
VIEW_RULES = {"few_shot": "map_max", "fused": FUSED}   # few-shot alone: its map maximum decides


@dataclass
class FewShotEval:
    k: int
    coreset: float | None
    seed: int
    root: str
    quiet: bool = False
    graph: object = None
    files: dict = field(default_factory=dict)      # data class → the train/good images of its memory
    memories: dict = field(default_factory=dict)   # data class → float32 [T, M, C]
    sources: dict = field(default_factory=dict)    # data class → how many train/good images went in

    def open(self, detector) -> None:
        from clipad.runtime.detector import graph_settings
        from clipad.runtime.fewshot import open_graph, require_features

        require_features(detector.manifest, detector.model_dir)
        self.graph = open_graph(detector.model_dir, detector.manifest, detector.backend.name,
                                **graph_settings(detector.backend))

    def choose(self, testset) -> None:
        """Every class's memory images, chosen (and a missing or short train/good refused) before any image runs."""
        from clipad.calibration import memory
        from clipad.runtime.inputs import list_images

        for cls, samples in testset.classes.items():
            folder = os.path.join(self.root, cls, "train", "good")
            if not os.path.isdir(folder):
                raise ClipadError(f"--fewshot {self.k}: {folder} does not exist (the memory comes from each class's "
                                  f"train/good, never from its test images)")
            test_hashes = {memory.file_sha256(s.path) for s in samples}
            listed = [p for p in list_images(folder, "--fewshot", single_file=False).paths
                      if memory.file_sha256(p) not in test_hashes]
            if len(listed) < self.k:
                raise ClipadError(f"--fewshot {self.k}: {folder} has only {len(listed)} image(s) that are not test "
                                  f"images")
            self.files[cls] = memory.pick(listed, self.k, self.seed)

    def memory_for(self, detector, cls: str, quiet: bool) -> np.ndarray:
        from clipad.calibration import memory
        from clipad.runtime.fewshot import as_loaded

        if cls in self.memories:
            return self.memories[cls]
        files = self.files[cls]
        features, _ = memory.features_of(detector, files, quiet or self.quiet)
        self.memories[cls] = as_loaded(memory.make_bank(features, self.coreset, self.seed, quiet or self.quiet))
        self.sources[cls] = len(files)
        return self.memories[cls]

    def predict(self, detector, image, model_class: str, memory: np.ndarray) -> list[dict]:
        """The three views of one image from one backbone run: zero-shot (the Detector's own decision), few-shot
        (its map, decided on the map maximum) and fused (the graph's fused map and score)."""
        from clipad.runtime.preprocess import prepare

        k = detector.class_index(model_class)
        maps, scores, features = detector.run_raw(prepare(image, detector.image_size)[None])
        zero = detector.decide(model_class, maps[0, k], float(scores[0, k]))
        fewshot, fused_map, fused_score = self.graph.run(features, memory, maps[:, k], scores[:, k])
        views = [_record(zero.anomaly_map, zero.score, zero.decision_score, zero.label, zero.error)]
        few_max = float(fewshot[0].max())
        views.append(_record(fewshot[0], few_max, few_max, None, _nonfinite(fewshot[0])))
        views.append(_record(fused_map[0], float(fused_score[0]), float(fused_score[0]), None,
                             _nonfinite(fused_map[0], float(fused_score[0]))))
        return views

    @staticmethod
    def view(detector, name: str):
        """What the metrics code needs of a 'detector' for a view that has no calibration of its own."""
        return SimpleNamespace(rule=VIEW_RULES[name], backend=detector.backend,
                               policy=SimpleNamespace(class_calibration=lambda _name: None, calibration=None))


def _nonfinite(amap: np.ndarray, score: float = 0.0) -> str | None:
    from clipad.runtime.decision import nonfinite_error

    return nonfinite_error(score, amap)


def _record(amap, score, decision, label, error) -> dict:
    finite = error is None
    return {"score": score if finite else None, "map_max": float(amap.max()) if finite else None,
            "map_min": float(amap.min()) if finite else None, "decision_score": decision if finite else None,
            "pred": label, "error": error, "_map": amap}
