"""hetlm: the language of browsing.

Click logs -> page-level sessions -> small decoder LMs (single, k-means clusterwise, HeTLM)
-> next-session generation and outcome prediction.

The public Python API, one name per stage (README, "Python API"):

    prepare, PrepareConfig          a click log -> prepared samples and the page tokenizer
    train_single, ModelConfig, TrainConfig   one LM built, trained on prepared samples and saved
    train_lm, build_model           the training loop alone, on a model built from a preset
    HeTLM, HeTLMConfig              endogenous clusterwise LMs (an estimator: fit returns self, `model_`)
    KMeansClusterwise               k-means clusterwise LMs (the same contract)
    ClusterwiseLM, load_model       any saved model folder (a single LM is K = 1), with its tokenizer
    GenerationConfig, SetDecoder    decoding settings; the next session's set of pages from the LM's evidence
    Scorer, ScoreConfig, score_log  per-user scores of a log by a saved model
    run_experiment, ExperimentConfig, write_report   a whole run folder and its report

Names are imported when first used, so `import hetlm` stays fast and loads neither torch nor transformers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "prepare", "PrepareConfig": "prepare",
    "ModelConfig": "single", "train_single": "single",
    "TrainConfig": "train", "train_lm": "train", "build_model": "models",
    "HeTLM": "cluster.hetlm", "HeTLMConfig": "cluster.hetlm", "KMeansClusterwise": "cluster.kmeans",
    "ClusterwiseLM": "cluster.base", "load_model": "cluster.base",
    "GenerationConfig": "evaluate", "SetDecoder": "set_decoder",
    "Scorer": "score", "ScoreConfig": "score", "score_log": "score",
    "run_experiment": "experiment", "ExperimentConfig": "experiment", "write_report": "report",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule hetlm.prepare binds it here as `prepare`; the public name stays the function
        # (the module is sys.modules["hetlm.prepare"]).
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
