"""Server-side evaluation of the global model on a corpus the server is given."""
from __future__ import annotations

from fedser.common.cache import FeatureCache
from fedser.common.corpora import load_corpus
from fedser.common.data import TaskData, build_task_data
from fedser.common.features import FeatureSpec
from fedser.common.models import ModelConfig, build_model
from fedser.common.params import arrays_to_state
from fedser.common.training import evaluate_task


class ServerEvaluator:
    """Featurises the evaluation corpus once, then scores each round's global model."""

    def __init__(self, path: str, spec: FeatureSpec, cache: FeatureCache | None = None):
        corpus = load_corpus(path)
        self.data: dict[str, TaskData] = {}
        for task in sorted(corpus.tasks()):
            d = build_task_data([u for u in corpus.utterances if u.task == task], spec, task, cache, progress=False)
            if len(d):
                self.data[task] = d

    def evaluate(self, arrays: dict, model_config: ModelConfig) -> dict[str, float]:
        model = build_model(model_config)
        arrays_to_state(arrays, model)
        out = {}
        for task, d in self.data.items():
            allowed = sorted(set(d.y.tolist()))  # score over the classes this corpus has
            r = evaluate_task(model, d, allowed)
            out[f"{task}-accuracy"] = r["accuracy"]
            out[f"{task}-uar"] = r["uar"]
        return out
