"""How a kind of experiment data plugs into the runner (runner.py): one ExperimentKind per
kind (gmm.py, templates.py), made of the steps that depend on the data. The runner does the
rest (run folder, resume, the two training phases, the transition, results.json, plots), so
adding a kind means one new module and one entry in runner.KINDS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ExperimentKind:
    """The data-dependent steps of the phase-transition experiment.

    name: the value of ExperimentConfig.data that selects this kind.
    data_type: the data set's class (an NpzRecord): ``data.to_bytes()`` is its .npz file,
        ``data_type.load(path or bytes)`` reads it back.
    make_data(config): the data set of a configuration (train (N, ...), val, ground_truth()).
    Data, models and x_init reach these steps on the device of the work; backend and precision
    (keyword arguments of evaluate_baselines, train and evaluate) go to every op call.
    evaluate_baselines(data, ts, *, sizes, draws, seed, progress): per-t losses of the ground
        truth, memorizing and partially memorizing (each M in sizes) denoisers, as
        {name: {split: losses}} or {name: {M: {split: losses}}} (JSON-ready).
    model_type: the trained-model dataclass (persisted by diffmem.training.store).
    train(config, data, sizes, *, progress, checkpoint, checkpoint_every, checkpoint_seconds,
        resume_state): {M: model} for sizes, resumable from the given training state.
    batched: whether train takes all sizes of a phase at once (else one size per call).
    evaluate(model, data, ts, *, x_init, draws, seed, threshold): (metrics, artifacts) for one
        trained model: metrics JSON-ready with "size", "memorization_ratio" and "variance";
        artifacts {name: tensor} saved beside them (names listed in ``artifacts``).
    describe_data(config, data): the "data" entry of results.json.
    model_shapes(config, data, M): {field: shape} of every tensor of a trained model of size M
        (a saved model is reused on resume only with these shapes).
    memory(config): estimated bytes of the run's dominant arrays: {"training": one training
        call, "evaluation": one loss evaluation or sampling batch, "kept": what the run holds
        throughout (data, models, loss histories)}; see budget.py.
    artifacts: the artifact names evaluate returns; a model's evaluation counts as done on
        resume only when they were saved.
    theory_note: None when the closed-form (GMM theory) crossovers apply, else why not (they
        are then reported as None with this note).
    plots(results, out): extra figures in out/plots beyond the common ones; returns the files.
    """

    name: str
    data_type: type
    make_data: Callable
    evaluate_baselines: Callable
    model_type: type
    train: Callable
    batched: bool
    evaluate: Callable
    describe_data: Callable
    model_shapes: Callable
    memory: Callable
    artifacts: tuple[str, ...] = ()
    theory_note: str | None = None
    plots: Callable | None = None


__all__ = ["ExperimentKind"]
