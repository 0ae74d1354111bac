"""params.yaml -> a typed, validated config.

Every section is a pydantic model that forbids unknown keys, so a misspelled
key is an error that names the key and the file instead of a silent default.
Later sections (models, evaluation) live here too, so `params.yaml` has one
schema and `diffrep params --check` can validate the whole file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """params.yaml is missing, unreadable, or does not match the schema."""


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .nan` or `time_budget_s: .inf` is an error naming the key, not a silent NaN run
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------- data
class ShapesConfig(Section):
    """The procedural 3D renderer (data.source: shapes)."""

    n_objects: int = Field(1000, ge=2)
    views_per_object: int = Field(5, ge=2)


class DataConfig(Section):
    source: Literal["mnist5k", "digits", "shapes", "imagefolder", "torchvision"] = "mnist5k"
    seed: int = Field(0, ge=0)  # the data's seed (shapes' scenes, the split); `seed` seeds training and evaluation
    path: str | None = None  # imagefolder: the folder; torchvision: "Name:root", e.g. "CIFAR10:data/raw/cifar"
    image_size: int = Field(16, ge=4, le=512)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # carved out of the rest, for every choice (never test)
    min_per_class: int = Field(2, ge=1)  # validation: fewer images in a class is an error
    min_rows: int = Field(20, ge=2)  # validation: fewer images in all is an error
    chunk_size: int = Field(2048, ge=1)  # prepare decodes, validates and writes this many images at a time
    workers: int = Field(1, ge=0)  # prepare's decoding processes; 0: one per CPU core; 1: in-process, no pool
    shapes: ShapesConfig = ShapesConfig()

    @model_validator(mode="after")
    def _path_when_needed(self) -> "DataConfig":
        if self.source in ("imagefolder", "torchvision") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(f"data.test_fraction + data.val_fraction = {self.test_fraction + self.val_fraction:g} "
                             "leaves nothing to train on: keep their sum below 1")
        return self


# ---------------------------------------------------------------- runtime
class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    # auto: bf16 autocast on CUDA; on a CPU, bf16 only for the stages in runtime.CPU_BF16 and only with native
    # bf16 (AVX512-BF16 or AMX), else fp32 (docs/training.md#precision); fp32 / bf16 force
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    channels_last: bool = True  # NHWC memory format for 4-D activations
    num_threads: int = Field(0, ge=0)  # 0: torch's default (all cores)
    # DDP from the stage itself (train/launch.py): training stages start their own workers via torch's elastic launcher
    nproc_per_node: int = Field(1, ge=0)  # workers on this machine; 0: one per visible CUDA device (1 without CUDA)
    nnodes: int = Field(1, ge=1)  # machines; > 1: run the same `diffrep stage X` on each (docs/gpu.md)
    rdzv_endpoint: str = "127.0.0.1:29400"  # host:port of the c10d rendezvous (node 0's address when nnodes > 1)
    rdzv_id: str = "diffrep"  # the job's rendezvous id: the same on every node, different for concurrent jobs


# ---------------------------------------------------------------- training engine
class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)  # global batch; split across DDP ranks
    micro_batch: int = Field(0, ge=0)  # most rows per forward/backward in one process (grad accumulation); 0: no split
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ckpt_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0)  # TensorBoard sample grid every N steps; 0: only at the end
    time_budget_s: float = Field(0, ge=0)  # 0: no budget; else stop early (recorded in metrics)
    # online representation quality (train/online.py): val kNN of the EMA features every N steps; 0: off.
    # Only the representation learners (soda, ul.stage1, ldae) measure it; elsewhere it must stay 0.
    eval_every: int = Field(0, ge=0)
    select: Literal["last", "best"] = "last"  # best: keep the EMA weights of the step with the best val kNN

    @model_validator(mode="after")
    def _select_needs_eval(self) -> "TrainConfig":
        if self.select == "best" and not self.eval_every:
            raise ValueError("train.select: best needs train.eval_every > 0 (nothing is measured to choose from)")
        return self


# ---------------------------------------------------------------- networks
class UNetConfig(Section):
    channels: int = Field(32, ge=8)
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(1, ge=1)
    attn_resolutions: tuple[int, ...] = (4,)  # feature-map sizes that get a self-attention block
    groups: int = Field(8, ge=1)  # GroupNorm groups
    heads: int = Field(2, ge=1)


class EncoderConfig(Section):
    width: int = Field(32, ge=4)
    depth: int = Field(1, ge=1)  # residual blocks per stage
    stages: int = Field(3, ge=1)  # each stage after the first halves the resolution


class DiffusionConfig(Section):
    schedule: Literal["cosine", "shifted_cosine", "inverted_cosine", "linear_logsnr"] = "inverted_cosine"
    parameterization: Literal["eps", "v", "x0"] = "eps"
    weighting: Literal["plain", "elbo", "sigmoid"] = "plain"
    sigmoid_bias: float = 0.0
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 1.0  # shifted_cosine: logSNR + 2*log(1/shift)
    sample_steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0)
    # where the sampler's steps fall: same (uniform t on `schedule`) | cosine | linear_logsnr (diffusion/sampler.py)
    sample_grid: Literal["same", "cosine", "linear_logsnr"] = "same"


# ---------------------------------------------------------------- SODA
class ViewsConfig(Section):
    """2D view policies (random-resized crop, flip, intensity jitter)."""

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    flip: bool = False  # digits are not mirror-symmetric
    brightness: float = Field(0.3, ge=0)
    contrast: float = Field(0.3, ge=0)


class SodaConfig(Section):
    z_dim: int = Field(96, ge=1)
    views: Literal["augment", "same"] = "augment"  # same: plain auto-encoding (paper's ablation; 3D: one view)
    # layer: one z sub-vector per UNet level (SODA); global: the whole z modulates every level (one group)
    modulation: Literal["layer", "global"] = "layer"
    source_views: ViewsConfig = ViewsConfig()
    target_views: ViewsConfig = ViewsConfig(crop_scale=(0.8, 1.0), brightness=0.0, contrast=0.0)
    mask_rate: float = Field(0.2, ge=0, lt=1)  # per-sub-vector masking (disentanglement)
    z_drop: float = Field(0.1, ge=0, lt=1)  # classifier-free guidance: drop the whole z
    pose_drop: float = Field(0.1, ge=0, lt=1)  # ... and, independently, the pose
    guidance: float = Field(0.3, ge=0)  # w in eps = (1+w) eps(c) - w eps(null)
    encoder: EncoderConfig = EncoderConfig(width=16)
    encoder_head: Literal["flatten", "mean"] = "flatten"  # final map -> z: flatten or global average pool, then Linear
    unet: UNetConfig = UNetConfig(channels=16, channel_mult=(1, 2, 4))
    diffusion: DiffusionConfig = DiffusionConfig(sample_steps=25)
    train: TrainConfig = TrainConfig(steps=1200, ema_decay=0.995, ckpt_every=250, log_every=25, eval_every=200)
    eval_images: int = Field(200, ge=1)  # test images used for reconstruction PSNR/SSIM


# ---------------------------------------------------------------- Unified Latents
class UlStage1Config(Section):
    """Encoder + diffusion prior (plain ELBO) + diffusion decoder, trained jointly (models/ul.py)."""

    latent_channels: int = Field(4, ge=1)  # latent grid: (latent_channels, H / 2**(stages-1), W / 2**(stages-1))
    logsnr_z0: float = 5.0  # the fixed noise level of the latent, lambda_z(0)
    logsnr_z1: float = -15.0  # the prior's terminal noise level (small end KL)
    loss_factor: float = Field(3.0, gt=0)  # c_lf: trades bits for reconstruction fidelity
    encoder: EncoderConfig = EncoderConfig(width=16)
    prior: UNetConfig = UNetConfig(channels=32, channel_mult=(1, 2), attn_resolutions=())
    decoder: UNetConfig = UNetConfig(channels=16, channel_mult=(1, 2, 4))
    # weighting: sigmoid (or elbo); sigmoid_bias is b in sigmoid(b - lambda); v-prediction (see models/ul.py)
    decoder_diffusion: DiffusionConfig = DiffusionConfig(schedule="cosine", parameterization="v", weighting="sigmoid",
                                                         sigmoid_bias=2.0, sample_steps=32)
    train: TrainConfig = TrainConfig(steps=600, ema_decay=0.995, ckpt_every=200, log_every=25, eval_every=100)
    eval_images: int = Field(500, ge=1)  # test images (evenly spaced over the split) for bits/px, PSNR, SSIM


class UlStage2Config(Section):
    """A larger base model on the frozen stage-1 latents, sigmoid weighting, sampled down to logsnr_z0."""

    base: UNetConfig = UNetConfig(channels=64, channel_mult=(1, 2), attn_resolutions=(2,))
    # shift 0.2 adds 2 log 5 = 3.2 to the logSNR of the cosine schedule
    diffusion: DiffusionConfig = DiffusionConfig(schedule="shifted_cosine", shift=0.2, parameterization="v",
                                                 weighting="sigmoid", sample_steps=32)
    train: TrainConfig = TrainConfig(steps=1500, ema_decay=0.995, ckpt_every=250, log_every=25)
    sample_images: int = Field(64, ge=1)  # the sample grid written by the stage


class UlConfig(Section):
    stage1: UlStage1Config = UlStage1Config()
    stage2: UlStage2Config = UlStage2Config()


# ---------------------------------------------------------------- l-DAE
class ViTConfig(Section):
    patch_size: int = Field(4, ge=1)
    dim: int = Field(96, ge=8)  # must be divisible by 4 (2D sin-cos positions) and by heads
    depth: int = Field(4, ge=2)  # the first half of the blocks is the encoder
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


class LdaeConfig(Section):
    noise_space: Literal["latent", "pixel"] = "latent"  # the paper's ablation
    pca_dim: int = Field(16, ge=1)  # d: noise goes into the top-d PCA components
    pca_fit_patches: int = Field(20000, ge=100)
    # true: every coefficient scaled to unit variance, so sigma noises all top-d components alike;
    # false: the natural (orthonormal) scale, so the noise drowns low-variance detail before coarse structure
    standardize: bool = True
    rest_weight: float = Field(0.1, ge=0)  # loss weight on components beyond d
    sigma_max: float = Field(1.4142135623730951, gt=0)  # sigma_t linear from 0 to sqrt(2)
    feature_logsnr: float = 10.0  # the small fixed noise level used for probe features
    # mean: average-pooled encoder tokens (the paper); flatten: tokens concatenated, keeping their layout
    feature_pool: Literal["mean", "flatten"] = "flatten"
    # random-resized crop + intensity jitter of each training image, as SODA draws its views (None: off)
    augment: ViewsConfig | None = None
    vit: ViTConfig = ViTConfig(patch_size=8, dim=128, depth=6)
    train: TrainConfig = TrainConfig(steps=1500, batch_size=128, lr=4e-3, warmup_steps=50, ema_decay=0.99,
                                     ckpt_every=250, log_every=25, eval_every=250)


# ---------------------------------------------------------------- evaluation
class FeatureNetConfig(Section):
    """The in-domain classifier whose penultimate layer is the Fréchet-distance feature space (eval/feature_net.py)."""

    width: int = Field(16, ge=4)  # channels of the first stage, doubled at each later stage
    stages: int = Field(3, ge=1)  # each stage after the first halves the resolution
    depth: int = Field(1, ge=1)  # residual blocks per stage
    groups: int = Field(8, ge=1)  # GroupNorm groups (must divide width)
    augment: ViewsConfig = ViewsConfig(crop_scale=(0.75, 1.0), brightness=0.1, contrast=0.1)
    train: TrainConfig = TrainConfig(steps=500, batch_size=128, lr=3e-3, warmup_steps=30, weight_decay=0.05,
                                     ema_decay=0.99, ckpt_every=200, log_every=50)


class LinearProbeConfig(Section):
    """`probe`: frozen features -> BatchNorm(affine=False) -> linear (the MAE recipe), and weighted kNN.

    The one protocol of every stage (eval/probe.py): `lr` and `knn_k` are candidates, chosen on val.
    """

    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)  # probe head init + data order (+ random-init encoders)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: tuple[float, ...] = Field((1e-2, 3e-2, 1e-1), min_length=1)  # candidates; the best on val is used
    weight_decay: float = Field(1e-4, ge=0)
    knn_k: tuple[int, ...] = Field((10, 20, 50), min_length=1)  # candidates; the best on val is used
    knn_temperature: float = Field(0.07, gt=0)
    pca_dim: int = Field(32, ge=1)  # the PCA-on-raw-pixels baseline
    pca_rows: int = Field(10000, ge=2)  # train rows the pixel PCA is fitted on (a fixed draw if the split has more)
    random_init: bool = True  # probe a freshly initialised copy of each encoder (the honest baseline)
    bootstrap: int = Field(2000, ge=100)  # resamples for intervals of seed-averaged scores and permutation tests

    @model_validator(mode="after")
    def _positive(self) -> "LinearProbeConfig":
        if any(lr <= 0 for lr in self.lr) or any(k < 1 for k in self.knn_k):
            raise ValueError("probe.lr candidates must be > 0 and probe.knn_k candidates >= 1")
        return self


class DciConfig(Section):
    """DCI disentanglement (Eastwood & Williams 2018) on data with known factors (eval/dci.py)."""

    method: Literal["random_forest", "lasso"] = "random_forest"  # the paper's two importance estimators
    bins: int = Field(10, ge=2)  # continuous factors -> this many equal-frequency classes
    n_estimators: int = Field(20, ge=1)  # random_forest
    max_depth: int | None = Field(8, ge=1)  # random_forest; None: grow fully
    lasso_c: float = Field(0.1, gt=0)  # lasso: inverse strength of the L1 penalty (logistic regression)
    max_train: int = Field(2000, ge=10)  # codes used to fit the importance estimators
    pca_dim: int = Field(32, ge=1)  # the PCA-of-pixels baseline code


class EvalConfig(Section):
    """`eval`: the fid_reference and generation_eval stages (FD/KID against stored reference statistics)."""

    n_samples: int = Field(500, ge=2)  # UL samples per sample seed; the floors use as many real images
    sample_seeds: tuple[int, ...] = Field((0, 1), min_length=1)  # independent sample draws; FD/KID are their mean
    bootstrap: int = Field(200, ge=20)  # resamples for the FD/KID intervals and paired tests
    base_steps: int | None = Field(None, ge=1)  # None: ul.stage2.diffusion.sample_steps
    decoder_steps: int | None = Field(None, ge=1)  # None: ul.stage1.decoder_diffusion.sample_steps
    recon_images: int = Field(128, ge=2)  # test images reconstructed by UL stage 1 for the reconstruction FD
    batch_size: int = Field(250, ge=1)  # images per forward pass
    grid_images: int = Field(64, ge=1)
    inception_weights: str | None = None  # local standard FID InceptionV3 weights (.pth) -> also inception_fid
    dci: DciConfig = DciConfig()


class ShapesEvalConfig(Section):
    """`shapes_eval` (pipelines/shapes): novel views, DCI with intervals, edits (stages/shapes_eval.py)."""

    source_views: tuple[int, ...] = Field((1, 2, 3), min_length=1)  # k views averaged in z; each k < views_per_object
    max_objects: int = Field(200, ge=2)  # test objects rendered from a new pose (the first n)
    pose_bins: tuple[int, int] = (6, 3)  # azimuth x elevation bins of the mean-image baseline
    edit_pairs: int = Field(100, ge=2)  # test objects whose sub-vectors are swapped with a neighbour's
    interp_steps: int = Field(8, ge=2)  # images in the interpolation strip
    reader_pca_dim: int = Field(64, ge=1)  # the factor reader: PCA of pixels -> a random forest per factor
    reader_pca_rows: int = Field(10000, ge=2)  # train rows the reader's PCA is fitted on (a fixed draw if more)
    bootstrap: int = Field(1000, ge=100)  # resamples over test objects (NVS scores, DCI)


# ---------------------------------------------------------------- orchestration
class PipelineConfig(Section):
    """How flows/pipeline.py runs each DVC stage under Prefect."""

    retries: int = Field(0, ge=0)  # extra attempts per stage after a failure
    retry_delay_s: float = Field(0, ge=0)
    timeout_s: dict[str, float] = {}  # stage name -> seconds; the stage's process group is killed after it


# ---------------------------------------------------------------- root
class Config(Section):
    seed: int = Field(0, ge=0)  # numpy's generators refuse negative seeds
    data: DataConfig = DataConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    soda: SodaConfig = SodaConfig()
    ul: UlConfig = UlConfig()
    ldae: LdaeConfig = LdaeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    feature_net: FeatureNetConfig = FeatureNetConfig()
    probe: LinearProbeConfig = LinearProbeConfig()
    eval: EvalConfig = EvalConfig()
    shapes_eval: ShapesEvalConfig = ShapesEvalConfig()

    def section(self, dotted: str) -> Any:
        """The (sub)section a dotted name picks, e.g. "ul.stage1"."""
        out = dotted_get(self, dotted, _MISSING)
        if out is _MISSING:
            raise ConfigError(f"params: no section {dotted!r} in the schema (see diffrep/config.py)")
        return out


def image_size_problems(cfg: Config, stage: str) -> list[str]:
    """Why data.image_size cannot pass through the networks `stage` builds (every halving must be exact); [] if it can.

    Checked when the stage starts (stages/runner.py), before anything is trained or written.
    """
    s = cfg.data.image_size
    out = []

    def halves(key: str, value: Any, size: int, times: int, what: str) -> None:
        if size % 2**times:
            out.append(f"{key}={value} halves the {what} {times} time(s), so it must be a multiple of {2**times}; "
                       "change data.image_size or that key")

    if stage == "soda":
        halves("soda.encoder.stages", cfg.soda.encoder.stages, s, cfg.soda.encoder.stages - 1, f"data.image_size={s}")
        mult = cfg.soda.unet.channel_mult
        halves("soda.unet.channel_mult", mult, s, len(mult) - 1, f"data.image_size={s}")
    if stage in ("ul_stage1", "ul_stage2"):
        u1 = cfg.ul.stage1
        halves("ul.stage1.encoder.stages", u1.encoder.stages, s, u1.encoder.stages - 1, f"data.image_size={s}")
        latent = s // 2 ** (u1.encoder.stages - 1)
        grid = f"{latent}x{latent} latent grid (data.image_size={s} / 2**(ul.stage1.encoder.stages-1))"
        nets = [("ul.stage1.decoder", u1.decoder, s, f"data.image_size={s}"), ("ul.stage1.prior", u1.prior, latent, grid)]
        if stage == "ul_stage2":
            nets.append(("ul.stage2.base", cfg.ul.stage2.base, latent, grid))
        for key, net, size, what in nets:
            if not out:  # a latent size from an uneven encoder is meaningless
                halves(f"{key}.channel_mult", net.channel_mult, size, len(net.channel_mult) - 1, what)
    if stage == "ldae" and s % cfg.ldae.vit.patch_size:
        out.append(f"ldae.vit.patch_size={cfg.ldae.vit.patch_size} must divide data.image_size={s}")
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' (misspelled? see the schema in diffrep/config.py)")
        else:
            lines.append(f"{source}: key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(raw: dict | None, source: str = "params") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path = "params.yaml", overrides: dict | None = None) -> Config:
    """Load and validate params.yaml; `overrides` is a nested dict merged on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if overrides:
        raw = deep_merge(raw, overrides)
    return parse_config(raw, str(path))


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_MISSING = object()


def dotted_get(node: Any, dotted: str, default: Any) -> Any:
    """node["a"]["b"] for "a.b", through nested dicts and config sections alike; `default` if a part is missing."""
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, BaseModel) and part in type(node).model_fields:
            node = getattr(node, part)
        else:
            return default
    return node


def to_dict(section: BaseModel) -> dict:
    """A JSON-able dict of a (sub)config: what lineage blocks and fingerprints record."""
    return section.model_dump(mode="json")
