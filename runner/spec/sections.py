"""The typed view of every spec section: frozen dataclasses whose defaults are the schema's.

Each class is the view of one object of the schema (schemas/sections/*.schema.json); the field
types are written here, the defaults and the set of keys come from the schema through
:func:`runner.spec.config.schema_config` (see its module doc for the rules). Read a resolved spec
with :func:`spec_config` (``spec_config(spec.data).train.lora.rank``) or one section with
``TrainConfig.from_dict(spec.data["train"])``. tests/test_typed_config.py walks the schema: every
property has a field here, with the schema's default and a type that fits.

Classes are listed per section, the nested ones before the object that holds them (the
annotations are evaluated when the class is made: no ``from __future__ import annotations``).
"""

from collections.abc import Mapping
from typing import Any

from runner.spec.config import schema_config

# --------------------------------------------------------------------------- character


@schema_config('character', 'traits')
class TraitsConfig:
    fixed: tuple[str, ...]
    variable: tuple[str, ...]


@schema_config('character')
class CharacterConfig:
    name: str
    display_name: str
    aliases: tuple[str, ...]
    pronouns: str | None
    trigger: str
    class_word: str
    description: str
    style: str
    traits: TraitsConfig
    references: tuple[str, ...]
    canonical_reference: str | None


# --------------------------------------------------------------------------- dataset


@schema_config('dataset', 'export', 'identity_crops', 'background')
class BackgroundConfig:
    model: str | None
    session: str | None
    output: str
    color: str


@schema_config('dataset', 'export', 'identity_crops')
class IdentityCropsConfig:
    adapters: tuple[str, ...]
    max_upscale: float
    max_yaw: float
    max_pitch: float
    background: BackgroundConfig


@schema_config('dataset', 'export')
class DatasetExportConfig:
    formats: tuple[str, ...]
    repeats: int
    identity_crops: IdentityCropsConfig


@schema_config('dataset', 'captions')
class CaptionsConfig:
    template: str
    extra_tags: tuple[str, ...]
    model: str | None


@schema_config('dataset', 'extract')
class ExtractConfig:
    enabled: bool
    max_per_category: int
    min_gap_s: float
    sample_fps: float


@schema_config('dataset', 'shots')
class ShotsConfig:
    strategy: str
    targets: Mapping[str, tuple[float, ...]]
    augment_min_side: int
    max_repeats: int
    allow_flips: bool


@schema_config('dataset', 'curation')
class CurationConfig:
    identity_threshold: float | None
    require_face: bool
    dedupe_hamming: int
    min_face_px: int
    min_blur: float
    max_clipped: float


@schema_config('dataset', 'analysis')
class AnalysisConfig:
    backend: str
    insightface_pack: str
    insightface_root: str
    dlib_detector: str
    upsample: int
    max_analysis_side: int
    workers: int


@schema_config('dataset', 'ingest')
class IngestConfig:
    extensions: tuple[str, ...]
    max_pixels: int
    max_side: int
    min_side: int
    format: str


@schema_config('dataset', 'sources', '[]', 'video_options')
class VideoOptionsConfig:
    tau: float | None
    upsample: int | None
    max_per_bucket: int
    novelty_add: float
    anchors: int
    challenge: int
    early_stop: bool
    stop_novelty: float
    conditioning_ratio: tuple[float, ...]
    adjust_ratio: bool
    pair_set: bool
    pair_max: int
    general_model: str | None
    general_fallback: str
    crop_scale: float
    crop_max_side: int
    on_truncated: str
    full_detect_every: int
    profile_detector: str


@schema_config('dataset', 'sources', '[]')
class SourceConfig:
    images: str | None
    recursive: bool
    video: str | None
    people: int
    stride: int
    label: str
    video_options: VideoOptionsConfig


@schema_config('dataset')
class DatasetConfig:
    sources: tuple[SourceConfig, ...]
    ingest: IngestConfig
    analysis: AnalysisConfig
    curation: CurationConfig
    shots: ShotsConfig
    extract: ExtractConfig
    captions: CaptionsConfig
    export: DatasetExportConfig


# --------------------------------------------------------------------------- train


@schema_config('train', 'checkpoints')
class TrainCheckpointsConfig:
    every_steps: int
    every_epochs: int | None
    keep_last: int
    sample_prompts: tuple[str, ...]
    sample_seeds: tuple[int, ...]
    sample_steps: int
    sample_guidance: float
    sample_negative_prompt: str
    validation_fraction: float
    validation_timesteps: tuple[int, ...]


@schema_config('train', 'phases', '[]')
class PhaseConfig:
    name: str
    steps: int | None
    epochs: int | None
    lr: float | None
    mix: Mapping[str, float] | str


@schema_config('train', 'regularization')
class RegularizationConfig:
    enabled: bool
    images: str | None
    count: int
    prompt: str | None
    prior_loss_weight: float
    steps: int


@schema_config('train', 'lr_scheduler')
class LrSchedulerConfig:
    name: str
    warmup_steps: int
    num_cycles: int


@schema_config('train', 'lora')
class LoraConfig:
    rank: int
    alpha: float | None
    dropout: float
    target_modules: tuple[str, ...] | None
    train_text_encoder: bool
    text_encoder_lr: float | None


@schema_config('train', 'objective')
class TrainObjectiveConfig:
    timestep_sampling: str | None
    logit_mean: float | None
    logit_std: float | None
    mode_scale: float | None
    shift: float | None
    weighting: str | None
    guidance: float | None


@schema_config('train', 'memory')
class MemoryConfig:
    quantize_base: str
    text_encoders: str
    offload_idle: bool


@schema_config('train', 'buckets')
class BucketsConfig:
    enabled: bool
    min_side: int
    max_side: int
    step: int


@schema_config('train')
class TrainConfig:
    preset: str | None
    base_model: str
    model_family: str
    resolution: int
    buckets: BucketsConfig
    lora: LoraConfig
    steps: int
    lr: float
    batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    mixed_precision: str
    optimizer: str
    memory: MemoryConfig | None
    weight_decay: float
    max_grad_norm: float
    lr_scheduler: LrSchedulerConfig
    min_snr_gamma: float | None
    noise_offset: float
    objective: TrainObjectiveConfig | None
    caption_dropout: float
    shuffle_tags: bool
    keep_tokens: int
    caption_variants: int
    regularization: RegularizationConfig
    seed: int
    phases: tuple[PhaseConfig, ...]
    variants: Mapping[str, Mapping[str, Any]]
    include_base_variant: bool
    checkpoints: TrainCheckpointsConfig


# --------------------------------------------------------------------------- train_video


@schema_config('train_video', 'images')
class TrainVideoImagesConfig:
    use: bool
    max: int | None


@schema_config('train_video', 'clips')
class TrainVideoClipsConfig:
    enabled: bool
    frames: int
    stride: int
    max_per_source: int
    caption: str
    margin: float
    max_gap: int | None
    max_side: int


@schema_config('train_video', 'memory')
class TrainVideoMemoryConfig:
    quantize_base: str
    text_encoders: str
    offload_idle: bool
    offload_idle_expert: bool


@schema_config('train_video', 'checkpoints')
class TrainVideoCheckpointsConfig:
    every_steps: int
    every_epochs: int | None
    keep_last: int
    validation_fraction: float
    validation_timesteps: tuple[int, ...]


@schema_config('train_video')
class TrainVideoConfig:
    base_model: str | None
    model_family: str
    resolution: int
    buckets: BucketsConfig
    frame_buckets: tuple[int, ...]
    images: TrainVideoImagesConfig
    clips: TrainVideoClipsConfig
    experts: str
    lora: LoraConfig
    steps: int
    lr: float
    batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    mixed_precision: str
    optimizer: str
    memory: TrainVideoMemoryConfig | None
    weight_decay: float
    max_grad_norm: float
    lr_scheduler: LrSchedulerConfig
    objective: TrainObjectiveConfig | None
    caption_dropout: float
    seed: int
    phases: tuple[PhaseConfig, ...]
    variants: Mapping[str, Mapping[str, Any]]
    include_base_variant: bool
    checkpoints: TrainVideoCheckpointsConfig


# --------------------------------------------------------------------------- evaluate


@schema_config('evaluate', 'objective')
class ObjectiveConfig:
    maximize: str
    constraints: Mapping[str, str]


@schema_config('evaluate', 'suite', 'categories', '<name>')
class SuiteCategoryConfig:
    prompts: tuple[str, ...]
    negative: str


@schema_config('evaluate', 'suite')
class InlineSuiteConfig:
    categories: Mapping[str, SuiteCategoryConfig]


@schema_config('evaluate', 'video', 'targets')
class EvaluateVideoTargetsConfig:
    fidelity: str
    min_blinks: int
    not_frozen: bool
    max_drift: float | None


@schema_config('evaluate', 'video')
class EvaluateVideoConfig:
    checkpoints: str | tuple[int, ...]
    lora_scales: tuple[float, ...]
    prompts: tuple[str, ...]
    key_frames: tuple[str, ...]
    seeds: tuple[int, ...]
    frames: int | None
    width: int | None
    height: int | None
    steps: int | None
    targets: EvaluateVideoTargetsConfig


@schema_config('evaluate')
class EvaluateConfig:
    preset: str | None
    suite: str | InlineSuiteConfig
    categories: tuple[str, ...]
    prompts_per_category: int | None
    negative_prompt: str
    seeds: tuple[int, ...]
    lora_scales: tuple[float, ...]
    conditions: tuple[str, ...]
    checkpoints: str
    steps: int
    guidance: float
    resolution: int | None
    batch_size: int
    face_workers: int
    face_model: str
    insightface_pack: str | None
    insightface_root: str | None
    clip_model: str
    dino_model: str
    targets: Mapping[str, Mapping[str, str]]
    objective: ObjectiveConfig
    video: EvaluateVideoConfig | None


# --------------------------------------------------------------------------- generate


@schema_config('generate', 'api')
class GenerateApiConfig:
    token_env: str
    max_queue: int
    max_batch: int
    safety_filter: bool
    max_side: int
    max_body_bytes: int


@schema_config('generate', 'video', 'dynamics')
class VideoDynamicsConfig:
    frames: int
    frozen_below: float
    flow_side: int


@schema_config('generate', 'video', 'targets')
class VideoTargetsConfig:
    max_seconds: float | None
    max_cost: float | None
    gpu: str | None


@schema_config('generate', 'video', 'fidelity')
class VideoFidelityConfig:
    frames: int
    excellent: float
    fail: float
    on_fail: str
    retries: int
    face_model: str | None
    against: str


@schema_config('generate', 'video')
class VideoConfig:
    preset: str
    model: str
    source: str
    key_frames: tuple[int, ...]
    prompt: str | None
    steps: int | None
    guidance: float | None
    image_conditioning: float | None
    frames: int
    fps: int
    width: int
    height: int
    lora: str | None
    replace_first_frame: bool
    upscale: bool
    upsampler: str | None
    fidelity: VideoFidelityConfig
    targets: VideoTargetsConfig
    pipeline: str
    family: str
    audio: bool
    negative_prompt: str
    prompt_prefix: str | None
    prompt_suffix: str | None
    seed: int
    lora_scale: float
    decode_timestep: float
    decode_noise_scale: float
    suite: str | None
    dynamics: VideoDynamicsConfig
    offload: str
    vae_tiling: Any


@schema_config('generate', 'storyboard', 'reference_guided')
class ReferenceGuidedConfig:
    enabled: bool
    ip_adapter: str | None
    ip_adapter_weight_name: str | None
    ip_adapter_scale: float
    controlnet: str | None
    control: str
    pose_model: str
    pose_detector_file: str | None
    pose_estimator_file: str
    pose_parts: str
    controlnet_scale: float
    validate_against: str
    ip_adapter_subfolder: str | None
    ip_adapter_image_encoder_folder: str | None
    mode: str
    in_context_images: str
    lora: bool


@schema_config('generate', 'storyboard', 'validation')
class StoryboardValidationConfig:
    face_similarity: float | str | None
    clip_i: float | None
    retries: int
    face_model: str | None
    clip_model: str | None


@schema_config('generate', 'storyboard', 'llm')
class LlmConfig:
    base_url: str
    model: str
    api_key_env: str
    timeout_s: float
    response_format: str
    temperature: float
    refine_prompts: bool


@schema_config('generate', 'storyboard', 'scenes', '[]')
class SceneConfig:
    text: str
    shot: str
    prompt: str | None
    control_image: str | None
    hero: bool | None


@schema_config('generate', 'storyboard')
class StoryboardConfig:
    story: str
    planner: str
    min_scenes: int
    max_scenes: int
    scenes: tuple[SceneConfig, ...]
    llm: LlmConfig
    short_story: str
    style_prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int | None
    height: int | None
    validation: StoryboardValidationConfig
    reference_guided: ReferenceGuidedConfig
    batch_size: int


@schema_config('generate')
class GenerateConfig:
    checkpoint: str
    lora_scale: float | None
    base_model: str | None
    storyboard: StoryboardConfig | None
    video: VideoConfig | None
    api: GenerateApiConfig


# --------------------------------------------------------------------------- hardware


@schema_config('hardware', 'modal')
class ModalConfig:
    app_name: str | None
    volume: str
    secrets: tuple[str, ...]
    timeout_s: int
    retries: int
    max_parallel: int


@schema_config('hardware', 'budget')
class BudgetConfig:
    max_cost: float | None
    max_hours: float | None


@schema_config('hardware', 'cpu')
class CpuContainerConfig:
    cores: float
    memory_gib: float


@schema_config('hardware', 'stage_cpu', '<name>')
class StageCpuConfig:
    cores: float | None
    memory_gib: float | None


@schema_config('hardware', 'stage_map')
class StageMapConfig:
    analyze: int


@schema_config('hardware')
class HardwareConfig:
    backend: str
    device: str
    gpu: str
    stage_gpu: Mapping[str, str]
    stage_backend: Mapping[str, str]
    cpu: CpuContainerConfig
    stage_cpu: Mapping[str, StageCpuConfig]
    stage_map: StageMapConfig
    local_processes: int
    parallel: str
    gpu_memory_gib: Mapping[str, float]
    memory_check: str
    currency: str
    price_table: Mapping[str, float]
    budget: BudgetConfig
    modal: ModalConfig


# --------------------------------------------------------------------------- report


@schema_config('report')
class ReportConfig:
    title: str | None
    output_dir: str | None
    gallery_limit: int
    max_sections_per_kind: int
    thumbnail_px: int


# --------------------------------------------------------------------------- publish


@schema_config('publish')
class PublishConfig:
    to: str | None
    tag: str | None
    endpoint_url: str | None


# --------------------------------------------------------------------------- tracking


@schema_config('tracking', 'wandb')
class WandbConfig:
    enabled: bool
    project: str | None
    entity: str | None
    mode: str
    artifacts: bool


@schema_config('tracking', 'mlflow')
class MlflowConfig:
    enabled: bool
    tracking_uri: str | None
    experiment: str | None
    artifacts: bool


@schema_config('tracking')
class TrackingConfig:
    mlflow: bool | MlflowConfig
    wandb: bool | WandbConfig
    tags: Mapping[str, str]


# --------------------------------------------------------------------------- the whole spec


@schema_config()
class SpecConfig:
    """A resolved spec; the optional sections (train, evaluate, generate) are None when absent."""

    version: int
    character: CharacterConfig
    dataset: DatasetConfig
    train: TrainConfig | None
    train_video: TrainVideoConfig | None
    evaluate: EvaluateConfig | None
    generate: GenerateConfig | None
    hardware: HardwareConfig
    report: ReportConfig
    publish: PublishConfig
    tracking: TrackingConfig


def spec_config(data: Mapping[str, Any]) -> SpecConfig:
    """The typed view of a resolved spec (``Spec.data``); '$schema' is an editor hint, not config."""
    return SpecConfig.from_dict({k: v for k, v in data.items() if not k.startswith("$")}, where="spec")
