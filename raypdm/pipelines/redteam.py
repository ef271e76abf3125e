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

from pydantic import Field, field_validator, model_validator

from raypdm.config import Identities, JobConfig, StrictModel, Uri, validate_section
from raypdm.data.uri import join
from raypdm.train.distributed import DistributedConfig
from raypdm.train.dreambooth import TrainConfig
from raypdm.train.priors import ClassPriorSection
from raypdm.data.manifest import in_run_scope

__all__ = ["ProtectionSpec", "RedteamConfig", "RedteamPlan", "RedteamSampling", "run_redteam", "smoke_overrides"]


class ProtectionSpec(StrictModel):
    name: str = Field(description="a protection (raypdm protect --list) or 'none' for clean training data")
    options: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        return self.name.strip().lower().replace("-", "_")


class RedteamSampling(StrictModel):
    num_images: int = Field(16, ge=1)
    steps: int = Field(100, ge=1, le=1000)
    size: int = Field(512, ge=8, le=2048)
    w: float = Field(6.5, ge=0, description="Eq. 6 weight (guidance_scale = 1 + w: 6.5 is the paper's CFG 7.5)")
    scheduler: Literal["model", "ddim", "dpm", "euler", "pndm"] = Field(
        "pndm", description="sampler (pndm: SD 2.1-base's own; model: the export's DDPM schedule)")
    batch_size: int = Field(8, ge=1)


class StatisticsSection(StrictModel):
    """How Table 1, 2 and 4 aggregate and test (paper App. A.1 and Table 1's caption by default)."""

    unit: Literal["observation", "identity"] = Field(
        "observation", description="observation: means, spreads and tests over identities × generated images, "
                                   "paired by identity, prompt and seed (the paper); identity: each identity's "
                                   "mean first (with 4 identities no test can reach p ≤ 0.01)")
    alpha: float = Field(0.01, gt=0, lt=1, description="a Table 1 entry is starred at p ≤ alpha")
    test: Literal["improvement", "two-sided"] = Field(
        "improvement", description="improvement: one-sided in each metric's better direction (the paper's "
                                   "'significant improvement'); two-sided: any difference")


class RedteamConfig(JobConfig):
    data: Uri = Field(description="clean dataset root: <identity>/set_A|set_B|set_C")
    output: Uri = Field(description="run directory: every stage, the tables and report.html")
    identities: Identities = Field(None, description="comma-separated identity folder names, or all")
    protections: list[ProtectionSpec] = Field(default_factory=lambda: [ProtectionSpec(name="aspl")])
    purifiers: list[str] = Field(default_factory=lambda: ["none", "jpeg", "codeformer", "sr", "codesr"])
    purifier_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per purifier name")
    modes: list[Literal["cdl", "vanilla"]] = Field(default_factory=lambda: ["cdl", "vanilla"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    methods: list[str] | None = Field(
        None, description="only these '<purifier> + <mode>' combinations (e.g. 'none + vanilla', 'codesr + cdl'); "
                          "None: every purifier × mode")
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    prompt_preset: Literal["paper", "official-code"] = Field(
        "paper", description="CDL prompt strings of every fine-tune (raypdm/train/prompts.py)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    class_prior: ClassPriorSection = Field(default_factory=ClassPriorSection)
    sampling: RedteamSampling = Field(default_factory=RedteamSampling)
    metrics: list[str] = Field(default_factory=lambda: ["ims", "q", "lpips", "ssim", "ms_ssim", "psnr"])
    lpips_backbone: Literal["pretrained", "random"] = "pretrained"
    workers: int = Field(1, ge=1, description="actors per model stage")
    ours: list[str] = Field(default_factory=lambda: ["codesr + cdl", "codeformer+sr + cdl"],
                            description="the method(s) under test in Table 1 ('<purifier> + <mode>')")
    baseline: str = Field("each", description="what a starred Table 1 entry of `ours` beats: 'each' (every "
                                              "other method, as the paper's 'vs the baselines'), 'best' (the "
                                              "strongest other method by mean IMS) or one method such as "
                                              "'none + vanilla' (every method tested against it)")
    statistics: StatisticsSection = Field(default_factory=StatisticsSection)
    benchmark_plots: list[Uri] | None = Field(
        None, description="PNG URIs shown under 'benchmarks' in the report [this checkout's benchmarks/results]")
    grid_images: int = Field(3, ge=1, le=16, description="images per row in the report's grids")

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

    @field_validator("purifier_options")
    @classmethod
    def _known_purifier_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from raypdm.purify import list_purifiers, purifier_options_model

        for name, options in v.items():
            if name not in list_purifiers():
                raise ValueError(f"unknown purifier {name!r}; known: {', '.join(list_purifiers())}")
            validate_section(purifier_options_model(name), options, name)  # under `purifier_options`
        return v

    @field_validator("protections")
    @classmethod
    def _known_protections(cls, v: list[ProtectionSpec]) -> list[ProtectionSpec]:
        from raypdm.pipelines.protect import protection_options

        for i, p in enumerate(v):
            if p.label() != "none":
                protection_options(p.label(), p.options, i, "options")  # under `protections`
        if len({p.label() for p in v}) != len(v):
            raise ValueError("protections: each protection may appear once")
        return v


    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("give at least one '<purifier> + <mode>', or leave it out for every combination")
        return list(dict.fromkeys("{} + {}".format(*split_method(m)) for m in v))

    @model_validator(mode="after")
    def _known_methods(self) -> RedteamConfig:
        for method in self.methods or ():
            purifier, mode = split_method(method)
            if purifier not in self.purifiers or mode not in self.modes:
                raise ValueError(f"methods: {method!r} is not a purifier of `purifiers` ({', '.join(self.purifiers)}) "
                                 f"with a mode of `modes` ({', '.join(self.modes)})")
        return self

    def used_purifiers(self) -> list[str]:
        """The purifier chains some cell trains on (all of `purifiers` unless `methods` leaves some out)."""
        if self.methods is None:
            return list(self.purifiers)
        used = {split_method(m)[0] for m in self.methods}
        return [p for p in self.purifiers if p in used]


def split_method(method: str) -> tuple[str, str]:
    """'codeformer+sr + cdl' -> ('codeformer+sr', 'cdl'): the mode is what follows the last '+'."""
    purifier, _, mode = method.rpartition("+")
    purifier, mode = purifier.strip().lower(), mode.strip().lower()
    if not purifier or mode not in ("cdl", "vanilla"):
        raise ValueError(f"{method!r} is not '<purifier> + <mode>' with mode cdl or vanilla")
    return purifier, mode


def smoke_overrides() -> dict[str, Any]:
    """The smoke matrix (tiny models, minutes on a CPU): `--smoke`, the demo's last stage and CI run it.
    jobs/configs/redteam.yaml's `smoke:` section says the same (a test keeps them equal)."""
    return {
        "preset": "tiny", "weights_dir": None,
        # two steps of 6/255 still reach the 11/255 radius (K·α ≥ r)
        "protections": [{"name": "advdm", "options": {"steps": 2, "step": "6/255", "resample": False}}],
        "purifiers": ["none", "codesr"],
        "purifier_options": {"sr": {"steps": 2}},
        "modes": ["cdl", "vanilla"],
        # The paper's headline comparison, its baseline against its method: every stage kind (no purifier and
        # CodeSR, vanilla and CDL) in two fine-tunes per identity instead of the 2 × 2 ablation's four
        # (`--set methods=null` runs all four).
        "methods": ["none + vanilla", "codesr + cdl"],
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


class RedteamPlan:
    """The stage configs of a matrix, built in one place: `run_redteam` runs them, and anything that runs a
    stage of the matrix first (the demo's story stages) builds it from here, so the matrix finds it finished
    (same inputs, same config, same output folder: the stages' content-hashed resume skips it)."""

    def __init__(self, cfg: RedteamConfig):
        self.cfg = cfg

    def protected_uri(self, protection: str) -> str:
        return self.cfg.data if protection == "none" else join(self.cfg.output, "protect", protection)

    def purified_uri(self, protection: str, purifier: str) -> str:
        if purifier == "none":
            return self.protected_uri(protection)
        return join(self.cfg.output, "purify", protection, _label(purifier))

    def protect_config(self, p: ProtectionSpec):
        from raypdm.pipelines.protect import ProtectJobConfig

        c = self.cfg
        return ProtectJobConfig(input=c.data, output=self.protected_uri(p.label()), method=p.label(), options=p.options,
                                preset=c.preset, weights_dir=c.weights_dir, identities=c.identities, workers=c.workers,
                                lpips_backbone=c.lpips_backbone)

    def purify_config(self, protection: str, purifier: str):
        from raypdm.pipelines.purify import PurifyConfig
        from raypdm.purify import parse_spec

        c = self.cfg
        opts = {n: c.purifier_options[n] for n in parse_spec(purifier) if n in c.purifier_options}
        return PurifyConfig(input=self.protected_uri(protection), output=self.purified_uri(protection, purifier),
                            purifier=purifier, options=opts, preset=c.preset, weights_dir=c.weights_dir,
                            identities=c.identities, splits=["set_A"], reference=c.data,
                            lpips_backbone=c.lpips_backbone, workers=c.workers, batch_size=4)

    def cells(self) -> list[_Cell]:
        c = self.cfg
        keep = None if c.methods is None else set(c.methods)
        return [_Cell(protection=p.label(), purifier=spec, mode=m, seed=s)
                for p in c.protections for spec in c.purifiers for m in c.modes for s in c.seeds
                if keep is None or f"{spec} + {m}" in keep]

    def train_config(self, cell: _Cell):
        from raypdm.pipelines.train import TrainJobConfig

        c = self.cfg
        return TrainJobConfig(
            data=self.purified_uri(cell.protection, cell.purifier), output=join(c.output, "train", cell.path()),
            identities=c.identities, preset=c.preset, weights_dir=c.weights_dir, cdl=cell.mode == "cdl",
            prompt_preset=c.prompt_preset, protocol=c.protocol,
            train=c.train.model_copy(update={"seed": cell.seed}), distributed=c.distributed,
            # One content-keyed cache for every cell: cells with the same prior settings generate it once.
            class_prior=c.class_prior if c.class_prior.cache else
            c.class_prior.model_copy(update={"cache": join(c.output, "train", "_class_priors")}),
        )

    def sample_config(self, cell: _Cell):
        from raypdm.pipelines.sample import SampleJobConfig

        c, s = self.cfg, self.cfg.sampling
        return SampleJobConfig(models=join(c.output, "train", cell.path()), output=join(c.output, "sample", cell.path()),
                               protocol=c.protocol, identities=c.identities, workers=c.workers, batch_size=s.batch_size,
                               sampling={"num_images": s.num_images, "steps": s.steps, "w": s.w, "height": s.size,
                                         "width": s.size, "seed": cell.seed, "scheduler": s.scheduler})

    def evaluate_config(self, cell: _Cell):
        from raypdm.pipelines.evaluate import EvaluateConfig

        c = self.cfg
        return EvaluateConfig(images=join(c.output, "sample", cell.path()), reference=c.data,
                              output=join(c.output, "evaluate", cell.path()), metrics=c.metrics, preset=c.preset,
                              weights_dir=c.weights_dir, identities=c.identities, lpips_backbone=c.lpips_backbone,
                              workers=c.workers, settings={"protection": cell.protection, "purifier": cell.purifier,
                                                           "mode": cell.mode, "seed": str(cell.seed),
                                                           "method": cell.method})

    def mismatch_config(self):
        """The CLIP latent-mismatch probe on clean / protected / purified set_A (first protection, every chain);
        None when the matrix has no protection."""
        from raypdm.pipelines.evaluate import EvaluateConfig

        c = self.cfg
        prot = next((p.label() for p in c.protections if p.label() != "none"), None)
        if prot is None:
            return None
        groups = {"protected": self.protected_uri(prot)}
        for spec in c.used_purifiers():
            if spec != "none":
                groups[f"purified_{_label(spec)}"] = self.purified_uri(prot, spec)
        return EvaluateConfig(images=self.protected_uri(prot), reference=c.data, output=join(c.output, "mismatch"),
                              metrics=["mismatch"], preset=c.preset, weights_dir=c.weights_dir,
                              identities=c.identities, mismatch_groups=groups, settings={"protection": prot},
                              splits=["set_A"])


@in_run_scope
def run_redteam(cfg: RedteamConfig, *, log=print, progress: bool = False, show_stages: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole matrix; returns {"results": DataFrame, "tables": {...}, "report": uri}.

    progress: the live training lines; show_stages: print the stage table at the end."""
    from raypdm.config import save_resolved_config
    from raypdm.pipelines.evaluate import run_evaluate
    from raypdm.pipelines.protect import run_protect
    from raypdm.pipelines.purify import run_purify
    from raypdm.pipelines.sample import run_sample
    from raypdm.pipelines.stage import StageSummary
    from raypdm.pipelines.train import run_train_many
    from raypdm.runtime import init_ray
    from raypdm.ui import stage_summary_table

    init_ray()
    t0 = time.perf_counter()
    plan = RedteamPlan(cfg)
    save_resolved_config(cfg, cfg.output, "redteam_config.yaml")
    summaries: list[Any] = []

    # 1. protections (none = the clean data itself)
    protected: dict[str, str] = {}
    for p in cfg.protections:
        if p.label() != "none":
            log(f"protect: {p.label()}")
            summaries += run_protect(plan.protect_config(p))
        protected[p.label()] = plan.protected_uri(p.label())

    # 2. purifier chains on each protected set_A (the other splits stay clean references)
    purified: dict[tuple[str, str], str] = {}
    for prot in protected:
        for spec in cfg.used_purifiers():
            if spec != "none":
                log(f"purify: {prot} × {spec}")
                summaries.append(run_purify(plan.purify_config(prot, spec)))
            purified[(prot, spec)] = plan.purified_uri(prot, spec)

    # 3-5. train, sample, evaluate each cell
    cells = plan.cells()
    # All cells' identities train in one Ray Tune fan-out: they share the cluster's GPUs at once.
    train_cfgs = [plan.train_config(cell) for cell in cells]
    log(f"train: {len(cells)} cells (protection × purifier × mode × seed)")
    t_train = time.perf_counter()
    # one row of the stage table for the whole fan-out, counted in identity trainings
    train_row = StageSummary(f"train ({len(cells)} cells)", cfg.output)
    for cell, tcfg, outcomes in zip(cells, train_cfgs, run_train_many(train_cfgs, log=lambda msg: None, progress=progress)):
        failed = [o["identity"] for o in outcomes if o["status"] == "failed"]
        if failed:
            log(f"  {cell.path()}: training failed for {failed}: see {tcfg.output}/train_summary.parquet")
        train_row.total += len(outcomes)
        train_row.errors += len(failed)
        train_row.skipped += sum(o["status"] == "skipped" for o in outcomes)
    train_row.processed = train_row.total - train_row.skipped - train_row.errors
    train_row.seconds = time.perf_counter() - t_train
    summaries.append(train_row)
    eval_dirs: list[tuple[_Cell, str]] = []
    for i, cell in enumerate(cells, 1):
        log(f"sample + evaluate {i}/{len(cells)}: {cell.path()}")
        summaries.append(run_sample(plan.sample_config(cell)))
        ecfg = plan.evaluate_config(cell)
        summaries.append(run_evaluate(ecfg))
        eval_dirs.append((cell, ecfg.output))

    results = _collect(eval_dirs)
    tables = _tables(cfg, results, purified)
    plots = _mismatch(plan)
    report = _report(cfg, results, tables, plots, protected, purified, time.perf_counter() - t0)
    if show_stages:
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

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    # A column with no value at all (`error` when nothing failed) would be typed null: keep it a string.
    table = table.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema],
                                 metadata=table.schema.metadata))
    buf = io.BytesIO()
    pq.write_table(table, buf)
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

        st = cfg.statistics
        if cfg.baseline == "each":
            baselines: str | list[str] | None = [m for m in dict.fromkeys(ok["method"]) if m not in cfg.ours]
        elif cfg.baseline == "best":
            baselines = best_baseline(ok, cfg.ours)
            baselines = [baselines] if baselines else None
        else:
            baselines = cfg.baseline
        t1 = table1(ok, method_col="method", protection_col="protection", baselines=baselines, ours=cfg.ours,
                    unit=st.unit, alternative=st.test, alpha=st.alpha)
        out["table1"] = write_table(t1, join(cfg.output, "tables", "table1"))
        if len(t1.attrs["tests"]):  # every p-value behind the stars, for whoever wants to check them
            _parquet(t1.attrs["tests"], join(cfg.output, "tables", "table1_tests.parquet"))
        abl = ok.copy()
        abl["codeformer"] = abl["purifier"].map(lambda s: _has(s, "codeformer"))
        abl["sr"] = abl["purifier"].map(lambda s: _has(s, "sr"))
        abl["cdl"] = abl["mode"] == "cdl"
        out["table4"] = write_table(table4(abl, unit=st.unit), join(cfg.output, "tables", "table4"))
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
        frames.append(df[["purifier", "protection", "identity", "split", "name", "seconds",
                          *[c for c in cols.values() if c in df]]])
    if frames:
        faith = pd.concat(frames, ignore_index=True)
        faith = faith.replace([math.inf, -math.inf], float("nan"))
        out["table2"] = write_table(table2(faith, purifier_col="purifier", unit=cfg.statistics.unit),
                                    join(cfg.output, "tables", "table2"))
    return out


def _has(spec: str, name: str) -> bool:
    if spec == "none":
        return False
    from raypdm.purify import parse_spec

    return name in parse_spec(spec)


def _mismatch(plan: RedteamPlan) -> list[tuple[str, str]]:
    from raypdm.pipelines.evaluate import run_evaluate

    ecfg = plan.mismatch_config()
    if ecfg is None:
        return []
    run_evaluate(ecfg)
    return [("CLIP latent mismatch: clean vs protected vs purified", join(ecfg.output, "mismatch.png"))]


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
    titles = {"table1": "Table 1: IMS and Q per method and protection (mean ± std; * significant improvement, "
                        "Wilcoxon: see the caption)",
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
               "purifiers": ", ".join(cfg.used_purifiers()), "modes": ", ".join(cfg.modes),
               **({"methods": ", ".join(cfg.methods)} if cfg.methods else {}), "preset": cfg.preset,
               "rows": str(len(results)), "seconds": f"{seconds:.0f}"},
        grids=grids, tables=table_refs, plots=plot_refs,
    )
    index.write(cfg.output)
    return write_report(cfg.output)
