"""One noise-token trial: fine-tune once per identity, then sample and score every (w, negative prompt).

Cost model: a token (and its template, and the training data) needs a fine-tune; a guidance weight or a
negative prompt needs only sampling. So a trial trains each identity once and evaluates every sampling
setting on that model: never a re-train per w.

Early stopping: every `report_every` steps the trial samples a few probe images at the first w, scores
them and reports `score` to Ray Tune, so ASHA can stop a bad token before it finishes training. The
probe rows also land in Parquet (final = False), so a stopped trial leaves a trace of how far it got.

Rows are written by the trial itself, one Parquet part per report under
`<output>/trials/<trial key>/`, so nothing is lost when a trial is stopped or a worker dies.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any

import numpy as np

from raypdm.config import config_hash

__all__ = ["trial_key", "run_trial", "score_images"]

ROW_COLUMNS = ("trial", "token", "template", "data", "identity", "w", "negative_prompt", "final", "step",
               "steps_trained", "ims", "ims_ip", "ims_vgg", "q", "liqe", "clip_iqac", "fdfr", "score",
               "images", "seconds")


def trial_key(config: dict[str, Any], trial_id: str | None = None) -> str:
    """The trial's identity across restarts: its point in the search space plus Tune's trial id. The id
    keeps apart two trials that draw the same point (Optuna repeats, `num_samples > 1`), whose parts would
    otherwise land in one folder; Tune keeps a trial's id across failures and `Tuner.restore`."""
    from raypdm.search.space import noise_of

    token, template = noise_of(config)
    point = config_hash({"token": token, "template": template, "data": config["data"]}, length=12)
    return f"{point}-{trial_id}" if trial_id else point


def score_images(images: list[np.ndarray], identity_scorer, quality_scorer, reference: dict) -> dict[str, float]:
    """Means over images of the identity and quality metrics, and FDFR."""
    from raypdm.metrics.identity import fdfr

    out: dict[str, float] = {}
    if identity_scorer is not None:
        rows = identity_scorer.score(images, reference)
        for k in ("ims", "ims_ip", "ims_vgg"):
            out[k] = float(np.mean([r[k] for r in rows]))
        out["fdfr"] = fdfr([r["face_found"] for r in rows])
    if quality_scorer is not None:
        rows = quality_scorer.score(images)
        for k in ("q", "liqe", "clip_iqac"):
            out[k] = float(np.mean([r[k] for r in rows]))
    return out


def objective(scores: dict[str, float], metric: str) -> float:
    if metric == "ims+q":
        return scores.get("ims", math.nan) + scores.get("q", math.nan)
    return scores.get(metric, math.nan)


def _write_rows(output: str, key: str, seq: int, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    from raypdm.data.uri import join, write_bytes

    buf = io.BytesIO()
    pd.DataFrame(rows, columns=list(ROW_COLUMNS)).to_parquet(buf, index=False)
    # root=: a trial runs in a worker process, which holds no lock to infer the root from.
    write_bytes(join(output, "trials", key, f"part-{seq:05d}.parquet"), buf.getvalue(), root=output)


def _instance_images(data_uri: str, identity: str) -> list[np.ndarray]:
    from raypdm.data.decode import decode_image
    from raypdm.data.layout import list_images
    from raypdm.data.uri import read_bytes

    refs, _ = list_images(data_uri, identities=[identity], splits=["set_A"])
    images = []
    for ref in refs:
        if ref.error is None:
            try:
                images.append(decode_image(read_bytes(ref.src_uri)))
            except Exception:  # a corrupt training image is left out, as the train stage does
                continue
    if not images:
        raise FileNotFoundError(f"{identity}: no usable images in {data_uri}/{identity}/set_A")
    return images


def run_trial(config: dict[str, Any], sweep, class_images: str, report, trial_id: str | None = None) -> dict[str, Any]:
    """Run one trial. `sweep` is the SweepConfig; `report(metrics)` is `ray.tune.report` (or a stub in
    tests); `trial_id` is Tune's. Returns the final metrics (also reported); every report carries the
    trial's key (`trial`), which ties the trial's Parquet parts to its Tune result."""
    import torch

    from raypdm.metrics.identity import IdentityOptions, IdentityScorer
    from raypdm.metrics.quality import QualityScorer
    from raypdm.pipelines.evaluate import _reference_images
    from raypdm.sample.decoupled import DecoupledSampler, SamplingConfig, seeds_for
    from raypdm.models.context import ModelContext
    from raypdm.search.space import class_suffix_for, noise_of
    from raypdm.train.distributed import _read_class_images
    from raypdm.train.dreambooth import DreamBoothTrainer
    from raypdm.train.prompts import cdl_prompts

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_models = ModelContext(device=device, preset=sweep.preset, weights_dir=sweep.weights_dir,
                               protocol=sweep.protocol)
    key = trial_key(config, trial_id)
    (token, template), data_name = noise_of(config), config["data"]
    data_uri = sweep.data_uris()[data_name]
    prompts = cdl_prompts(sweep.prompt_preset, token=token, instance_suffix=" " + template.strip(),
                          class_suffix=" " + class_suffix_for(template))
    # Scorers load once per trial; the reference embedding once per identity.
    metrics = sweep.metric_names()
    id_scorer = IdentityScorer(preset=sweep.preset, weights_dir=sweep.weights_dir, device=device,
                               options=IdentityOptions()) if "ims" in metrics else None
    q_scorer = QualityScorer(preset=sweep.preset, weights_dir=sweep.weights_dir, device=device) if "q" in metrics else None
    class_imgs = _read_class_images(class_images)
    ws, negatives = sweep.space.w_values(), sweep.space.negative_prompts
    seq, reports, steps_trained = 0, 0, 0
    per_setting: dict[tuple[float, str], list[float]] = {}
    common = {"trial": key, "token": token, "template": template, "data": data_name}

    for identity in sweep.identity_list(data_uri):
        reference = {"ip": None, "vgg": None}
        if id_scorer is not None:
            ref_images = _reference_images(sweep.reference, identity, "set_B")
            if ref_images:
                reference = id_scorer.reference_embedding(ref_images)
        instance = _instance_images(data_uri, identity)
        # a private copy per identity: it is fine-tuned
        parts = base_models.model("sd21-base", fresh=True)
        trainer = DreamBoothTrainer(parts, sweep.train, prompts)
        trainer.cache_latents(instance, class_imgs)

        def sample(w: float, negative: str, n: int, base_seed: int) -> list[np.ndarray]:
            scfg = SamplingConfig(prompts=[sweep.sampling_prompt], num_images=n, steps=sweep.sampling.steps, w=w,
                                  cdl_prompts=prompts.model_copy(update={"negative_prompt": negative}),
                                  height=sweep.sampling.size, width=sweep.sampling.size, seed=base_seed,
                                  batch_size=sweep.sampling.batch_size)
            for m in (parts.unet, parts.text_encoder):
                m.eval()
            try:
                sampler = DecoupledSampler(parts.to_pipeline(), scfg)
                return sampler.sample(sweep.sampling_prompt, seeds_for(base_seed, identity, 0, n))
            finally:
                parts.unet.train()
                parts.text_encoder.train(sweep.train.train_text_encoder)

        while trainer.step < sweep.train.steps:
            trainer.train_step()
            steps_trained += 1
            last = trainer.step == sweep.train.steps
            if trainer.step % sweep.report_every == 0 and not last:
                # Intermediate quality for ASHA: a few probe images at the first w.
                images = sample(ws[0], negatives[0], sweep.probe_images, sweep.seed + 1)
                scores = score_images(images, id_scorer, q_scorer, reference)
                score = objective(scores, sweep.metric)
                _write_rows(sweep.output, key, seq, [{**common, "identity": identity, "w": ws[0],
                                                     "negative_prompt": negatives[0], "final": False,
                                                     "step": trainer.step, "steps_trained": steps_trained,
                                                     **scores, "score": score, "images": len(images),
                                                     "seconds": time.perf_counter() - t0}])
                seq += 1
                reports += 1
                report({"score": score, "steps_trained": steps_trained, "identity": identity, "final": False,
                        "trial": key})
        # Trained once: every sampling setting from this model.
        rows = []
        for w in ws:
            for negative in negatives:
                images = sample(w, negative, sweep.sampling.num_images, sweep.seed)
                scores = score_images(images, id_scorer, q_scorer, reference)
                score = objective(scores, sweep.metric)
                per_setting.setdefault((w, negative), []).append(score)
                rows.append({**common, "identity": identity, "w": w, "negative_prompt": negative, "final": True,
                             "step": trainer.step, "steps_trained": steps_trained, **scores, "score": score,
                             "images": len(images), "seconds": time.perf_counter() - t0})
        _write_rows(sweep.output, key, seq, rows)
        seq += 1
        del trainer, parts
        if device == "cuda":
            torch.cuda.empty_cache()

    means = {k: float(np.nanmean(v)) for k, v in per_setting.items()}
    (best_w, best_neg), best = max(means.items(), key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1])
    final = {"score": best, "best_w": best_w, "best_negative": best_neg, "steps_trained": steps_trained,
             "final": True, "seconds": time.perf_counter() - t0, "trial": key}
    report(final)
    return final
