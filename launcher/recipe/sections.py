"""The recipe's sections: the user's contract, one pydantic class per YAML section.

Every field carries its one-sentence description; `mplaunch check --explain`
prints them and the README's reference table is generated from them. Loading,
overrides and the cross-field rules are launcher.recipe.schema's (which imports
this module, as launcher.recipe.rules does: neither needs the other's loader).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


def _no_bool(value: Any) -> Any:
    # YAML 1.1 reads yes/no/on/off as booleans, and Python's True == 1 would
    # otherwise slip through a Literal[0, 1, 2, 3].
    if isinstance(value, bool):
        shown = str(value).lower()
        raise ValueError(f"expected one of 0, 1, 2, 3, got {shown} (YAML reads yes/no/on/off as true/false)")
    return value


def _list_to_tuple(value: Any) -> Any:
    # YAML has lists, not tuples; strict mode would otherwise refuse every list.
    return tuple(value) if isinstance(value, list) else value


class Section(BaseModel):
    # allow_inf_nan=False: YAML reads .inf and .nan as numbers, and no field means them.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


# Counts become torch int64 values (tensor sizes, indices, seeds): larger ones are refused here.
INT_LIMIT = 2**63
PositiveInt = Annotated[int, Field(ge=1, lt=INT_LIMIT)]
Count = Annotated[int, Field(ge=0, lt=INT_LIMIT)]
# torch's AdamW refuses betas outside [0, 1).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class Lora(Section):
    rank: Count = 0
    """LoRA adapter rank (peft); 0: no LoRA, every parameter trains. With a rank only the adapters train and have optimizer state."""
    alpha: Annotated[float, Field(gt=0.0)] = 16.0
    """LoRA scaling numerator: the adapter's update is scaled by alpha / rank."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the adapters' input."""
    target_modules: list[str] = []
    """Names (suffixes) of the linear layers that get adapters; empty: peft's default for the architecture (model.hf), else every nn.Linear."""


class Model(Section):
    name: Literal["bert-mlm", "gpt2-lm", "tiny-mlp"] | None = "bert-mlm"
    """Built-in model; null (or left out) with `target` or `hf`: the built-in keys below are refused beside them."""
    size: Literal["tiny", "mini", "base", "large"] = "base"
    """Preset size of the built-in model (BERT-base is 110M parameters, tiny is a few hundred thousand)."""
    hidden_size: PositiveInt | None = None
    """Override the preset's hidden width."""
    num_layers: PositiveInt | None = None
    """Override the preset's number of transformer layers."""
    num_heads: PositiveInt | None = None
    """Override the preset's number of attention heads (must divide hidden_size)."""
    intermediate_size: PositiveInt | None = None
    """Override the preset's feed-forward width."""
    vocab_size: PositiveInt | None = None
    """Vocabulary size of the built-in model; defaults to the tokenizer's, or 30522 (BERT) / 50257 (GPT-2) for synthetic data."""
    max_position_embeddings: PositiveInt | None = None
    """Longest sequence the model accepts; defaults to 512 (BERT) / 1024 (GPT-2)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Dropout probability in the built-in transformers."""
    target: Annotated[str, Field(pattern=TARGET_PATTERN)] | None = None
    """Your own model: "module:factory" (the recipe's folder is searched first) returning an nn.Module whose forward(**batch) gives a loss."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for `target`, plus vocab_size (the run's) if the factory takes it; set here, it must be at least the tokenizer's."""
    hf: str | None = None
    """A Hugging Face model: a local directory with config.json (relative to the recipe), or a hub id the machine can reach; its Auto class follows data.task."""
    weights: Literal["pretrained", "random"] = "pretrained"
    """With `hf`: load its weights (pretrained), or build its architecture from the config with fresh weights (random)."""
    config: dict[str, Any] = {}
    """With `hf`: overrides of its config.json (e.g. num_hidden_layers: 2); with weights pretrained only keys that keep the weights' shapes."""
    num_labels: PositiveInt | None = None
    """Classes of data.task sequence-classification (labels 0..num_labels-1); default: the model config's, else 2."""
    init_from: str | None = None
    """Start a new run from these weights (a directory `mplaunch export` wrote, or any with model.safetensors or pytorch_model.bin): fresh optimizer, schedule and step 0."""
    lora: Lora = Lora()


class Data(Section):
    task: Literal["auto", "masked-lm", "causal-lm", "sequence-classification", "sft"] = "auto"
    """What the batches teach (README "Batches"): masked-lm, causal-lm, sequence-classification (a label per record) or sft (prompt/response, loss on the response only); auto: the built-in model's, the hf model's architecture's, else masked-lm."""
    kind: Literal["synthetic", "text", "jsonl", "json", "csv", "parquet", "arrow", "hf-disk"] = "synthetic"
    """synthetic random tokens (throughput work), local text / jsonl files, or files read by Hugging Face datasets (json, csv, parquet, arrow; hf-disk: a save_to_disk directory)."""
    paths: list[str] = []
    """Data files relative to the recipe file (kind hf-disk: the save_to_disk directory)."""
    pack: bool = True
    """masked-lm and causal-lm: concatenate the documents (a separator between them) and cut rows of seq_len; false: one document per row, cut or padded to seq_len (padding gets no loss)."""
    text_field: str = "text"
    """Field of each record that holds the text (masked-lm, causal-lm and sequence-classification)."""
    label_field: str = "label"
    """Field of each record that holds its class, a whole number (sequence-classification)."""
    prompt_field: str = "prompt"
    """Field of each record that holds the prompt (sft; its tokens get no loss)."""
    response_field: str = "response"
    """Field of each record that holds the response (sft; the loss is taken on it)."""
    tokenizer: str | None = None
    """A local tokenizer directory (from save_pretrained); when unset: model.hf's own, else one trained on `paths` (byte-level BPE for causal-lm and sft, else WordPiece)."""
    seq_len: PositiveInt = 128
    """Tokens per sample."""
    mask_prob: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    """Fraction of tokens masked for masked-LM models."""
    num_samples: PositiveInt = 4096
    """Samples in the synthetic dataset (one epoch)."""
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Fraction of the samples held out for evaluation."""
    num_workers: Count = 0
    """DataLoader worker processes per rank."""
    target: Annotated[str, Field(pattern=TARGET_PATTERN)] | None = None
    """Your own dataset: "module:factory" (the recipe's folder is searched first) called with seq_len, vocab_size and seed (those it takes) and `kwargs`, returning a map-style dataset whose items are dicts of input_ids, optionally attention_mask and labels."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for `target` (not seq_len, vocab_size or seed: mplaunch gives those from data.seq_len, the run's vocabulary and train.seed)."""
    accept_changed: Annotated[str, Field(pattern=r"^content-[0-9a-f]{12}$")] | None = None
    """On resume: accept data files whose content changed since the checkpoint was written (a resume compares each file's size and sha256 and refuses a change), naming the new content by the digest the refusal prints (content- and 12 hex digits); other content is still refused. The resume says what it accepted and trains on from the checkpoint's step with the new samples in their new order."""


class Optimizer(Section):
    name: Literal["adamw"] = "adamw"
    """The optimizer (AdamW, fused where the device supports it)."""
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    """Peak learning rate."""
    betas: Annotated[tuple[Beta, Beta], BeforeValidator(_list_to_tuple)] = (0.9, 0.999)
    """Adam beta1 and beta2."""
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    """Adam epsilon."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    """Decoupled weight decay."""


class Scheduler(Section):
    name: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear or cosine to min_lr_ratio x lr, or constant."""
    warmup_steps: Count = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    warmup_style: Literal["mplaunch", "hf"] = "mplaunch"
    """Warmup's factor at optimizer step n (from 0) of W: mplaunch (the default) (n+1)/(W+1), so the first step already moves the weights; hf n/W, Hugging Face's get_*_schedule_with_warmup exactly (lr 0 at the first step)."""
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Final learning rate as a fraction of lr."""


class Train(Section):
    micro_batch_size: PositiveInt | None = None
    """Samples per rank per forward pass."""
    global_batch_size: PositiveInt | None = None
    """Samples per optimizer step across all ranks (= micro_batch_size x grad_accum x world_size)."""
    grad_accum: PositiveInt | None = None
    """Micro-batches accumulated per optimizer step."""
    max_steps: PositiveInt = 1000
    """Optimizer steps to train."""
    eval_every: Count = 0
    """Evaluate every this many steps (0: never)."""
    eval_steps: Count = 0
    """Micro-batches per rank per evaluation, from the start of the held-out split; 0: the whole split. The loss is token-weighted (all label tokens of all ranks), with perplexity for language models, accuracy (and F1 for two classes) for classifiers."""
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    # torch seeds are 64-bit; below 2**63 the per-rank and per-step offsets stay in range.
    seed: Count = 1234
    """Seed for python, numpy and torch (offset by rank where ranks must differ)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of keeping them: less memory, about a third more compute."""
    loss: Literal["labelled", "full", "model"] = "labelled"
    """A language model's loss: labelled runs the output head and an fp32 cross-entropy on labelled positions only (the same loss, less work); full on every position; model: the model's own loss in its compute dtype, as a plain script computes it."""
    loss_normalization: Literal["tokens", "batch"] = "tokens"
    """How a language model's loss is averaged over an optimizer step: tokens divides the summed token losses of every micro-batch on every rank by the step's label tokens (as Hugging Face Trainer does); batch averages each micro-batch's mean; models computing their own loss always average per micro-batch (as batch)."""


class LossScale(Section):
    dynamic: bool = True
    """Dynamic loss scaling; false uses `initial` as a static scale."""
    initial: Annotated[float, Field(gt=0.0)] = 2.0**16
    """Starting loss scale (a power of two when dynamic), or the fixed scale when dynamic is false."""
    window: PositiveInt = 1000
    """Overflow-free steps before the scale doubles."""
    hysteresis: PositiveInt = 2
    """Overflows tolerated before the scale is halved."""
    consecutive_hysteresis: bool = False
    """Refill the hysteresis after every overflow-free step."""
    min: Annotated[float, Field(gt=0.0)] = 1.0
    """Lowest scale; overflowing there stops the run (DeepSpeed takes a whole number)."""


class Fp8(Section):
    scaling: Literal["tensorwise", "rowwise"] = "tensorwise"
    """How torchao float8 scales each fp8 cast: tensorwise (one scale per tensor; FSDP2 can all-gather the weights in fp8) or rowwise (one scale per row; finer, slower)."""
    keep_first_last: bool = True
    """Keep the first linear layers (those of the first module that holds any, e.g. block 0's attention) and the last one (the output head) in bf16."""
    keep: list[str] = []
    """More linear layers kept in bf16: module names or dotted suffixes of them, matched like model.lora.target_modules. Layers whose in or out features are not multiples of 16 always stay in bf16."""


class Precision(Section):
    dtype: Literal["auto", "fp32", "fp16", "bf16", "fp8"] = "auto"
    """Compute dtype; auto picks bf16 on CPUs with native bf16 (AVX512-BF16, AMX) and Ampere-or-newer GPUs, fp32 on other CPUs, fp16 on older GPUs (never fp8). fp8: the linear layers' matrix products in float8 (torchao; GPUs of compute capability 8.9+, emulated on CPU), everything else in bf16. Master weights stay fp32."""
    allow_tf32: bool = True
    """Let fp32 matrix products use TF32 tensor cores on Ampere or newer."""
    loss_scale: LossScale = LossScale()
    """Dynamic loss scaling for fp16."""
    fp8: Fp8 = Fp8()
    """The fp8 settings (precision.dtype fp8)."""


class Zero(Section):
    stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_no_bool)] = 0
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters (accelerate: 0 is DDP, 1-3 FSDP2, 1 runs as 2)."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) on the CPU; needs stage >= 1 (accelerate: with offload_params)."""
    offload_params: bool = False
    """Keep parameters on the CPU; needs stage 3 (accelerate: FSDP2's CPUOffloadPolicy, GPUs only)."""


# A duration in seconds: finite, and within what a timedelta (the collectives' timeout) takes.
Seconds = Annotated[float, Field(gt=0, le=10**7, allow_inf_nan=False)]


class Launch(Section):
    nnodes: PositiveInt = 1
    """Nodes; more than one needs --slurm."""
    nproc_per_node: Literal["auto"] | PositiveInt = "auto"
    """Processes per node: auto is one per visible GPU, or 1 on CPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train; auto is cuda when a GPU is visible."""
    max_restarts: Count = 0
    """Times torchrun restarts the workers after a failure."""
    master_port: Annotated[int, Field(ge=1024, le=65535)] | None = None
    """Rendezvous port; default: torchrun's --standalone picks a free one."""
    hang_timeout: Literal["auto"] | Seconds = "auto"
    """Seconds without a completed step on any rank before the launcher dumps the ranks' stacks to RUN_DIR/logs and stops them; auto: max(600, 20x the slowest step after 3 warm-up steps). A rank's setup before its first step gets at least 1800 s; a collective waits at most this plus 60 s (auto: 900 s)."""
    stop_grace: Literal["auto"] | Seconds = "auto"
    """Seconds the workers get after the first Ctrl-C or SIGTERM to checkpoint and exit before the launcher dumps their stacks and kills them; auto: the hang timeout's current limit."""


class Checkpoint(Section):
    dir: str | None = None
    """Checkpoint directory; default RUN_DIR/checkpoints. A relative path starts at the run directory; a directory outside it may be shared by runs, so each run keeps its checkpoints in DIR/NAME and never resumes from or prunes another run's (checkpoints an older mplaunch wrote straight into DIR move to DIR/NAME when their run starts again)."""
    every_steps: Count = 0
    """Save every this many steps (0: only at the end and on a stop request)."""
    keep: PositiveInt = 3
    """Newest checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the run directory's latest complete checkpoint."""


TrackerName = Literal["tensorboard", "wandb", "mlflow"]


class Wandb(Section):
    project: str = "mplaunch"
    """W&B project the run goes to."""
    entity: str | None = None
    """W&B team or user; default: the account's default entity."""
    name: str | None = None
    """Display name of the W&B run; default: the recipe's name. A sweep's runs (mplaunch sweep) are grouped by the sweep's name."""
    tags: list[str] = []
    """Tags of the W&B run."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: WANDB_MODE if set, else online when there are W&B credentials (WANDB_API_KEY or a netrc entry) and the W&B host answers within 3 s, else offline (RUN_DIR/wandb, uploaded later with `wandb sync`)."""


class Mlflow(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI (a server's http(s):// address, or a local store); default: MLFLOW_TRACKING_URI if set, else the local store RUN_DIR/mlruns (a sweep's runs share SWEEP_DIR/mlruns)."""
    experiment: str | None = None
    """MLflow experiment the run goes to (created if missing); default: the recipe's name (a sweep's runs: the sweep's name)."""
    tags: dict[str, str] = {}
    """Tags of the MLflow run, name: value."""


class Logging(Section):
    dir: str = "runs"
    """Parent of run directories; a run lives in DIR/NAME."""
    every_steps: PositiveInt = 10
    """Steps between metrics lines and console updates."""
    trackers: list[TrackerName] = ["tensorboard"]
    """Where rank 0 sends the metrics besides RUN_DIR/metrics.jsonl: tensorboard (RUN_DIR/tb), wandb (Weights & Biases), mlflow. A resumed run continues the same W&B and MLflow run (their ids are in RUN_DIR/trackers.json); a tracker that fails is turned off with a warning and training goes on."""
    tensorboard: bool = True
    """false leaves tensorboard out of logging.trackers (the older way to turn TensorBoard off)."""
    wandb: Wandb = Wandb()
    """Weights & Biases settings (logging.trackers wandb)."""
    mlflow: Mlflow = Mlflow()
    """MLflow settings (logging.trackers mlflow)."""
    progress: bool = True
    """Show progress: a live bar the launcher draws on a terminal, else one line per logging interval from rank 0."""
    precision_every: Count = 50
    """Steps between precision x-rays (at step 1 and every N-th: each layer's gradient range against fp16's limits, updates lost to rounding); 0: never."""
    memory_report: bool = False
    """After step 2 each rank writes RUN_DIR/memory/rank-N.json: bytes it holds in parameters, gradients, fp32 master weights and optimizer state."""

    @field_validator("trackers")
    @classmethod
    def _once_each(cls, value: list[TrackerName]) -> list[TrackerName]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return value

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_agrees(cls, data: Any) -> Any:
        # The two keys say one thing once validated (tensorboard == "tensorboard" in trackers), so the
        # resolved recipe (plan.json, recipe.yaml) validates again as it is.
        if not isinstance(data, dict):
            return data
        board, trackers = data.get("tensorboard"), data.get("trackers")
        if not isinstance(board, bool) or not isinstance(trackers, list):
            if isinstance(board, bool) and "trackers" not in data:
                return {**data, "trackers": [t for t in ("tensorboard",) if board]}
            if isinstance(trackers, list) and "tensorboard" not in data:
                return {**data, "tensorboard": "tensorboard" in trackers}
            return data
        if board != ("tensorboard" in trackers):
            said = "lists" if "tensorboard" in trackers else "leaves out"
            raise ValueError(
                f"logging.tensorboard {str(board).lower()} contradicts logging.trackers, which {said} "
                "tensorboard; set only logging.trackers"
            )
        return data

    @property
    def enabled_trackers(self) -> tuple[TrackerName, ...]:
        """logging.trackers (without tensorboard when logging.tensorboard is false)."""
        return tuple(t for t in self.trackers if self.tensorboard or t != "tensorboard")


class Slurm(Section):
    partition: str | None = None
    """Partition (sbatch --partition)."""
    account: str | None = None
    """Account to charge (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    time: str = "01:00:00"
    """Time limit, as sbatch takes it (HH:MM:SS or D-HH:MM:SS)."""
    gpus_per_node: Count | None = None
    """GPUs per node; default launch.nproc_per_node on GPU, 0 on CPU."""
    cpus_per_task: PositiveInt | None = None
    """CPU cores for each node's task."""
    mem: str | None = None
    """Memory per node (sbatch --mem, e.g. 64G)."""
    extra_sbatch: list[str] = []
    """Further #SBATCH options, e.g. "--constraint=h100"."""
    setup: list[str] = []
    """Shell lines run before the launch (module load, source venv)."""
    env: dict[str, str] = {}
    """Environment variables for the job, on top of mplaunch's defaults."""
    signal_s: Annotated[int, Field(ge=10)] = 120
    """Seconds before the time limit at which the job is told to checkpoint and requeue."""
    max_requeues: Count = 3
    """Requeues allowed after time limits or preemption."""


class Recipe(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)]
    """Run name (letters, digits, . _ -; at most 128); the run directory is logging.dir/name."""
    model: Model = Model()
    """What to train."""
    data: Data = Data()
    """What to train on."""
    optimizer: Optimizer = Optimizer()
    """Optimizer settings."""
    scheduler: Scheduler = Scheduler()
    """Learning-rate schedule."""
    train: Train = Train()
    """Batch arithmetic and loop settings."""
    precision: Precision = Precision()
    """Mixed precision."""
    backend: Literal["deepspeed", "accelerate"] = "deepspeed"
    """Which library wraps the model."""
    zero: Zero = Zero()
    """ZeRO sharding (FSDP2 under accelerate)."""
    launch: Launch = Launch()
    """Processes and devices."""
    checkpoint: Checkpoint = Checkpoint()
    """Checkpoints and resume."""
    logging: Logging = Logging()
    """Metrics and console."""
    slurm: Slurm = Slurm()
    """Batch-job settings for --slurm."""
    source: str = Field(default="", exclude=True)
    """(set by mplaunch) the recipe file this came from."""
