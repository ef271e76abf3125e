"""The red-team matrix: protections × purifier chains × {CDL, vanilla} × seeds, over every identity.

    clean data ─▶ protect (one stage per protection) ─▶ purify (one stage per protection × chain)
        ─▶ train (one Ray Tune fan-out over identities per cell) ─▶ sample ─▶ evaluate
        ─▶ results.parquet ─▶ Table 1 / Table 2 / Table 4 (.md, .html, .parquet) ─▶ mismatch plot
        ─▶ report_index.json + report.html

Every stage is the resumable stage of its own command, writing under `<output>/<stage>/<cell>/`, so a
re-run (or a bigger matrix over the same output) reuses whatever finished: rows are keyed by content
hash + stage config hash, trained identities by their config hash. Resources are sized per stage by
the stages themselves: classic purifiers (jpeg, gaussian, tvm) run as CPU tasks, model purifiers and
protections in GPU actor pools, training on whole GPUs, so mixed work packs onto one cluster.

Cells are named by their labels (protection "none" = clean training data; purifier "none" = no
purification). Table 1's methods are "<purifier> + <mode>", e.g. "codesr + cdl".
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Literal

from pydantic import Field, field_validator

from raypdm.config import JobConfig, StrictModel
from raypdm.data.layout import validate_component
from raypdm.data.uri import join
from raypdm.train.dreambooth import TrainConfig

__all__ = ["ProtectionSpec", "RedteamConfig", "RedteamSampling", "run_redteam", "smoke_overrides"]


class ProtectionSpec(StrictModel):
    name: str = Field(description="a protection (raypdm protect --list) or 'none' for clean training data")
    options: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        return self.name.strip().lower().replace("-", "_")


class RedteamSampling(StrictModel):
    num_images: int = Field(16, ge=1)
    steps: int = Field(100, ge=1, le=1000)
    size: int = Field(512, ge=8, le=2048)
    w: float = Field(7.5, ge=0)
    batch_size: int = Field(8, ge=1)


class RedteamConfig(JobConfig):
    data: str = Field(description="clean dataset root: <identity>/set_A|set_B|set_C")
    output: str = Field(description="run directory: every stage, the tables and report.html")
    identities: list[str] | None = None
    protections: list[ProtectionSpec] = Field(default_factory=lambda: [ProtectionSpec(name="aspl")])
    purifiers: list[str] = Field(default_factory=lambda: ["none", "jpeg", "codeformer", "sr", "codesr"])
    purifier_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per purifier name")
    modes: list[Literal["cdl", "vanilla"]] = Field(default_factory=lambda: ["cdl", "vanilla"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: str | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: dict[str, Any] = Field(default_factory=dict)
    class_prior: dict[str, Any] = Field(default_factory=dict)
    sampling: RedteamSampling = Field(default_factory=RedteamSampling)
    metrics: list[str] = Field(default_factory=lambda: ["ims", "q", "lpips", "ssim", "ms_ssim", "psnr"])
    lpips_backbone: Literal["pretrained", "random"] = "pretrained"
    workers: int = Field(1, ge=1, description="actors per model stage")
    ours: list[str] = Field(default_factory=lambda: ["codesr + cdl", "codeformer+sr + cdl"],
                            description="the method(s) under test in Table 1 ('<purifier> + <mode>')")
    baseline: str = Field("best", description="Table 1's Wilcoxon baseline: 'best' (the strongest method other "
                                              "than `ours`, by mean IMS) or a method such as 'none + vanilla'")
    benchmark_plots: list[str] | None = Field(
        None, description="PNG URIs shown under 'benchmarks' in the report [this checkout's benchmarks/results]")
    grid_images: int = Field(3, ge=1, le=16, description="images per row in the report's grids")

    @field_validator("identities")
    @classmethod
    def _safe_identities(cls, v):
        for ident in v or []:
            validate_component(ident, "identity")
        return v

    @field_validator("purifiers")
    @classmethod
    def _known_purifiers(cls, v: list[str]) -> list[str]:
        from raypdm.purify import parse_spec

        for spec in v:
            if spec.strip().lower() != "none":
                parse_spec(spec)
        if not v:
            raise ValueError("give at least one purifier chain ('none' for no purification)")
        return [s.strip().lower() for s in v]

    @field_validator("protections")
    @classmethod
    def _known_protections(cls, v: list[ProtectionSpec]) -> list[ProtectionSpec]:
        from raypdm.pipelines.protect import protection_options

        for p in v:
            if p.label() != "none":
                protection_options(p.label(), p.options)
        if len({p.label() for p in v}) != len(v):
            raise ValueError("protections: each protection may appear once")
        return v


def smoke_overrides() -> dict[str, Any]:
    """The smoke matrix (tiny models, minutes on a CPU): `--smoke`, the demo's last stage and CI run it.
    jobs/configs/redteam.yaml's `smoke:` section says the same (a test keeps them equal)."""
    return {
        "preset": "tiny", "weights_dir": None,
        "protections": [{"name": "advdm", "options": {"steps": 2, "resample": False}}],
        "purifiers": ["none", "codesr"],
        "purifier_options": {"sr": {"steps": 2}},
        "modes": ["cdl", "vanilla"],
        "train": {"steps": 2, "resolution": 64, "gradient_checkpointing": False},
        # Smoke runs train on the CPU even where GPUs (or a test's logical GPUs) exist.
        "distributed": {"backend": "ddp", "workers": 1, "gpus_per_worker": 0},
        "class_prior": {"count": 2, "steps": 2, "resolution": 64, "batch_size": 2},
        "sampling": {"num_images": 2, "steps": 2, "size": 64, "batch_size": 2},
        "lpips_backbone": "random",
        "workers": 1,
        "grid_images": 2,
    }


def _label(spec: str) -> str:
    return spec.replace("+", "_plus_")


class _Cell(StrictModel):
    protection: str
    purifier: str
    mode: str
    seed: int

    @property
    def method(self) -> str:
        return f"{self.purifier} + {self.mode}"

    def path(self) -> str:
        return f"{self.protection}/{_label(self.purifier)}/{self.mode}/seed{self.seed}"


def run_redteam(cfg: RedteamConfig, *, log=print, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole matrix; returns {"results": DataFrame, "tables": {...}, "report": uri}."""
    from raypdm.config import save_resolved_config
    from raypdm.pipelines.evaluate import EvaluateConfig, run_evaluate
    from raypdm.pipelines.protect import ProtectJobConfig, run_protect
    from raypdm.pipelines.purify import PurifyConfig, run_purify
    from raypdm.pipelines.sample import SampleJobConfig, run_sample
    from raypdm.pipelines.train import TrainJobConfig, run_train_many
    from raypdm.runtime import init_ray
    from raypdm.ui import stage_summary_table

    init_ray()
    t0 = time.perf_counter()
    out = cfg.output
    save_resolved_config(cfg, out, "redteam_config.yaml")
    summaries: list[Any] = []
    timings: dict[str, float] = {}

    # 1. protections (none = the clean data itself)
    protected: dict[str, str] = {}
    for p in cfg.protections:
        if p.label() == "none":
            protected["none"] = cfg.data
            continue
        uri = join(out, "protect", p.label())
        log(f"protect: {p.label()}")
        pcfg = ProtectJobConfig(input=cfg.data, output=uri, method=p.label(), options=p.options, preset=cfg.preset,
                                weights_dir=cfg.weights_dir, identities=cfg.identities, workers=cfg.workers,
                                lpips_backbone=cfg.lpips_backbone)
        t = time.perf_counter()
        summaries += run_protect(pcfg)
        timings[f"protect:{p.label()}"] = time.perf_counter() - t
        protected[p.label()] = uri

    # 2. purifier chains on each protected set_A (the other splits stay clean references)
    purified: dict[tuple[str, str], str] = {}
    for prot, src in protected.items():
        for spec in cfg.purifiers:
            if spec == "none":
                purified[(prot, spec)] = src
                continue
            from raypdm.purify import parse_spec

            names = parse_spec(spec)
            uri = join(out, "purify", prot, _label(spec))
            log(f"purify: {prot} × {spec}")
            opts = {n: cfg.purifier_options[n] for n in names if n in cfg.purifier_options}
            pcfg = PurifyConfig(input=src, output=uri, purifier=spec, options=opts, preset=cfg.preset,
                                weights_dir=cfg.weights_dir, identities=cfg.identities, splits=["set_A"],
                                reference=cfg.data, lpips_backbone=cfg.lpips_backbone, workers=cfg.workers,
                                batch_size=4)
            summaries.append(run_purify(pcfg))
            purified[(prot, spec)] = uri

    # 3-5. train, sample, evaluate each cell
    cells = [_Cell(protection=p, purifier=c, mode=m, seed=s)
             for (p, c) in purified for m in cfg.modes for s in cfg.seeds]
    # All cells' identities train in one Ray Tune fan-out: they share the cluster's GPUs at once.
    train_cfgs = [
        TrainJobConfig(
            data=purified[(cell.protection, cell.purifier)], output=join(out, "train", cell.path()),
            identities=cfg.identities or "all", preset=cfg.preset, weights_dir=cfg.weights_dir,
            cdl=cell.mode == "cdl", train=cfg.train.model_copy(update={"seed": cell.seed}),
            distributed=cfg.distributed, class_prior=cfg.class_prior,
        )
        for cell in cells
    ]
    log(f"train: {len(cells)} cells (protection × purifier × mode × seed)")
    for cell, tcfg, outcomes in zip(cells, train_cfgs, run_train_many(train_cfgs, log=lambda msg: None)):
        failed = [o["identity"] for o in outcomes if o["status"] == "failed"]
        if failed:
            log(f"  {cell.path()}: training failed for {failed}: see {tcfg.output}/train_summary.parquet")
    eval_dirs: list[tuple[_Cell, str]] = []
    for i, (cell, tcfg) in enumerate(zip(cells, train_cfgs), 1):
        log(f"sample + evaluate {i}/{len(cells)}: {cell.path()}")
        samples = join(out, "sample", cell.path())
        s = cfg.sampling
        scfg = SampleJobConfig(models=tcfg.output, output=samples, workers=cfg.workers, batch_size=s.batch_size,
                               sampling={"num_images": s.num_images, "steps": s.steps, "w": s.w, "height": s.size,
                                         "width": s.size, "seed": cell.seed})
        summaries.append(run_sample(scfg))
        evals = join(out, "evaluate", cell.path())
        ecfg = EvaluateConfig(images=samples, reference=cfg.data, output=evals, metrics=cfg.metrics,
                              preset=cfg.preset, weights_dir=cfg.weights_dir, lpips_backbone=cfg.lpips_backbone,
                              workers=cfg.workers, settings={"protection": cell.protection, "purifier": cell.purifier,
                                                             "mode": cell.mode, "seed": str(cell.seed),
                                                             "method": cell.method})
        summaries.append(run_evaluate(ecfg))
        eval_dirs.append((cell, evals))

    results = _collect(eval_dirs)
    tables = _tables(cfg, results, purified)
    plots = _mismatch(cfg, protected, purified)
    report = _report(cfg, results, tables, plots, protected, purified, time.perf_counter() - t0)
    stage_summary_table(summaries, title="red-team stages")
    return {"results": results, "tables": tables, "report": report, "seconds": time.perf_counter() - t0,
            "summaries": summaries}


def _collect(eval_dirs) -> Any:
    import pandas as pd

    from raypdm.data.manifest import Manifest

    frames = []
    for cell, uri in eval_dirs:
        df = Manifest(uri).read().to_pandas()
        if "clip_embedding" in df.columns:
            df = df.drop(columns=["clip_embedding"])
        for k, v in {"protection": cell.protection, "purifier": cell.purifier, "mode": cell.mode,
                     "seed": cell.seed, "method": cell.method}.items():
            df[k] = v
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _parquet(df, uri: str) -> None:
    from raypdm.data.uri import write_bytes

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    write_bytes(uri, buf.getvalue())


def _tables(cfg: RedteamConfig, results, purified: dict[tuple[str, str], str]) -> dict[str, dict[str, str]]:
    """Tables 1, 2, 4 as .md/.html/.parquet under <output>/tables; returns their URIs."""
    import pandas as pd

    from raypdm.data.manifest import Manifest
    from raypdm.metrics.tables import table1, table2, table4, write_table

    out: dict[str, dict[str, str]] = {}
    _parquet(results, join(cfg.output, "results.parquet"))
    ok = results[results["error"].isna()] if len(results) else results
    if len(ok):
        from raypdm.metrics.tables import best_baseline

        baseline = best_baseline(ok, cfg.ours) if cfg.baseline == "best" else cfg.baseline
        out["table1"] = write_table(table1(ok, method_col="method", protection_col="protection",
                                           baseline_method=baseline), join(cfg.output, "tables", "table1"))
        abl = ok.copy()
        abl["codeformer"] = abl["purifier"].map(lambda s: _has(s, "codeformer"))
        abl["sr"] = abl["purifier"].map(lambda s: _has(s, "sr"))
        abl["cdl"] = abl["mode"] == "cdl"
        out["table4"] = write_table(table4(abl), join(cfg.output, "tables", "table4"))
    # Table 2: faithfulness of each purifier's output to the clean image, and seconds per image.
    frames = []
    for (prot, spec), uri in purified.items():
        if spec == "none":
            continue
        df = Manifest(uri).read().to_pandas()
        df = df[df["error"].isna()]
        if not len(df):
            continue
        cols = {f"ref_{m}": m for m in ("lpips", "ssim", "ms_ssim", "psnr")}
        df = df.rename(columns=cols)
        df["purifier"] = spec
        df["protection"] = prot
        frames.append(df[["purifier", "protection", "identity", "seconds", *[c for c in cols.values() if c in df]]])
    if frames:
        faith = pd.concat(frames, ignore_index=True)
        faith = faith.replace([math.inf, -math.inf], float("nan"))
        out["table2"] = write_table(table2(faith, purifier_col="purifier"), join(cfg.output, "tables", "table2"))
    return out


def _has(spec: str, name: str) -> bool:
    if spec == "none":
        return False
    from raypdm.purify import parse_spec

    return name in parse_spec(spec)


def _mismatch(cfg: RedteamConfig, protected: dict[str, str], purified: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
    """The CLIP latent-mismatch probe on clean / protected / purified set_A (first protection, every chain)."""
    from raypdm.pipelines.evaluate import EvaluateConfig, run_evaluate

    prot = next((p for p in protected if p != "none"), None)
    if prot is None:
        return []
    groups = {"protected": protected[prot]}
    for (p, spec), uri in purified.items():
        if p == prot and spec != "none":
            groups[f"purified:{spec}"] = uri
    out = join(cfg.output, "mismatch")
    ecfg = EvaluateConfig(images=protected[prot], reference=cfg.data, output=out, metrics=["mismatch"],
                          preset=cfg.preset, weights_dir=cfg.weights_dir, identities=cfg.identities,
                          mismatch_groups={k.replace(":", "_").replace("+", "_"): v for k, v in groups.items()},
                          settings={"protection": prot}, splits=["set_A"])
    run_evaluate(ecfg)
    return [("CLIP latent mismatch: clean vs protected vs purified", join(out, "mismatch.png"))]


def _checkout_benchmark_plots() -> list[str]:
    """The benchmark plots of the checkout raypdm runs from (found beside the package, not in the current
    directory: a submitted job's working directory is Ray's unpacked copy of the checkout)."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return [str(p) for p in sorted(results.glob("*.png"))] if results.is_dir() else []


def _report(cfg: RedteamConfig, results, tables, plots, protected, purified, seconds: float) -> str:
    from raypdm.data.layout import list_images
    from raypdm.report.html import write_report
    from raypdm.report.index import GridRow, ImageGrid, PlotRef, ReportIndex, TableRef

    def first(uri: str, identity: str, split: str | None = None, n: int = 3) -> list[str | None]:
        try:
            refs, _ = list_images(uri, identities=[identity], splits=(split,) if split else None,
                                  any_split=split is None)
        except Exception:
            return [None] * n
        refs = [r for r in refs if r.error is None][:n]
        return [r.src_uri for r in refs] + [None] * (n - len(refs))

    n = cfg.grid_images
    grids = []
    identities = sorted(results["identity"].unique()) if len(results) else []
    for ident in identities:
        rows = [GridRow(label="clean set_A", images=first(cfg.data, ident, "set_A", n))]
        for prot, uri in protected.items():
            if prot != "none":
                rows.append(GridRow(label=f"protected: {prot}", images=first(uri, ident, "set_A", n)))
        for (prot, spec), uri in purified.items():
            if spec != "none" and prot != "none":
                rows.append(GridRow(label=f"purified: {prot} → {spec}", images=first(uri, ident, "set_A", n)))
        for cell_path in sorted({f"{r.protection}/{_label(r.purifier)}/{r.mode}/seed{r.seed}"
                                 for r in results[results["identity"] == ident].itertuples()}):
            rows.append(GridRow(label=f"generated: {cell_path}",
                                images=first(join(cfg.output, "sample", cell_path), ident, None, n)))
        grids.append(ImageGrid(identity=ident, columns=[f"image {i + 1}" for i in range(n)], rows=rows))
    titles = {"table1": "Table 1: IMS and Q per method and protection (mean ± std over identities; * p<0.05 vs "
                        "the baseline, Wilcoxon)",
              "table2": "Table 2: faithfulness of purified images to the clean ones, and seconds per image",
              "table4": "Table 4: ablation of CodeFormer / SR / CDL"}
    table_refs = [TableRef(title=titles[k], uri=v["html"]) for k, v in sorted(tables.items()) if "html" in v]
    plot_refs = [PlotRef(title=t, uri=u) for t, u in plots]
    for bench in (cfg.benchmark_plots if cfg.benchmark_plots is not None else _checkout_benchmark_plots()):
        plot_refs.append(PlotRef(title=f"benchmark: {bench.rstrip('/').rsplit('/', 1)[-1]}", uri=bench))
    index = ReportIndex(
        title="raypdm red-team report",
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
        facts={"data": cfg.data, "identities": str(len(identities)), "protections": ", ".join(protected),
               "purifiers": ", ".join(cfg.purifiers), "modes": ", ".join(cfg.modes), "preset": cfg.preset,
               "rows": str(len(results)), "seconds": f"{seconds:.0f}"},
        grids=grids, tables=table_refs, plots=plot_refs,
    )
    index.write(cfg.output)
    return write_report(cfg.output)
