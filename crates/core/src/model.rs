//! `model.toml`: what a model takes and returns, how to preprocess its input, how to batch it
//! and how many copies to run. One file per model, next to its numbered version directories.

use std::path::Path;

use serde::Deserialize;

/// The parsed `model.toml` of one model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model name; must equal its directory name.
    pub name: String,
    /// `classifier` (the default) or `tensor`; other kinds belong to other services.
    #[serde(default)]
    pub kind: Option<String>,
    /// Only `torchscript` is served.
    pub platform: String,
    /// One line for people and for `ModelMetadata`.
    #[serde(default)]
    pub description: String,
    /// Label source: a file next to `model.toml` (one label per line) or `builtin:imagenet1k`.
    #[serde(default)]
    pub labels: Option<String>,
    /// Model inputs; the runner feeds the first one.
    pub inputs: Vec<TensorSpec>,
    /// Model outputs in the order of the module's returned tuple.
    pub outputs: Vec<TensorSpec>,
    /// Image preprocessing, for models that take images.
    #[serde(default)]
    pub preprocess: Option<Preprocess>,
    /// Dynamic batching.
    #[serde(default)]
    pub batching: Batching,
    /// Model copies and threads.
    #[serde(default)]
    pub instance: Instance,
}

/// One input or output tensor, per item (no batch dimension).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    /// Open Inference Protocol datatype; only `FP32` is supported.
    pub datatype: String,
    /// Dimensions per item, batch dimension excluded.
    pub dims: Vec<i64>,
}

impl TensorSpec {
    /// Number of elements in one item.
    pub fn item_len(&self) -> usize {
        self.dims.iter().map(|d| *d as usize).product()
    }
}

/// Image preprocessing: decode → colour → resize → crop → scale → normalise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// `rgb` or `gray`.
    pub color: String,
    /// Resize (bilinear) so the shorter side has this length, keeping the aspect ratio.
    #[serde(default)]
    pub resize_shorter: Option<u32>,
    /// Center crop `[height, width]` after the resize.
    pub crop: [u32; 2],
    /// Multiplier applied to 0..255 pixel values before normalisation.
    pub scale: f32,
    /// Per-channel mean subtracted after scaling.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: Vec<f32>,
}

/// Dynamic batching settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Batching {
    /// Largest batch (in items) one model execution takes. Warm-up profiling may lower the
    /// effective value if bigger batches do not raise throughput on this hardware.
    pub max_batch_size: usize,
    /// How long a lane waits for more items when every other lane is busy. A lone request
    /// with an idle lane never waits.
    pub max_queue_delay_us: u64,
    /// Items queued per model; past it requests are refused with `RESOURCE_EXHAUSTED`.
    pub queue_capacity: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_queue_delay_us: 1000,
            queue_capacity: 256,
        }
    }
}

/// How a model is run: `[instance]` of `model.toml`, the same keys for every kind of model.
/// `repository.lanes/threads/device` in the service's config override them for every model.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Instance {
    /// Copies of the model, each on its own OS thread. Measured on 2 cores: two single-thread
    /// lanes beat one two-thread forward (91 vs 66 images/s on EfficientNet-Lite0). Default:
    /// the service's (2 for tensor models, 1 for the recommender); the language engine is
    /// always one lane.
    pub lanes: Option<usize>,
    /// libtorch intra-op threads per lane. Default 1.
    pub threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`. Default `cpu`.
    pub device: Option<String>,
}

/// An [`Instance`] with the service's overrides and defaults applied.
#[derive(Debug, Clone)]
pub struct RunOn {
    pub lanes: usize,
    pub threads: usize,
    pub device: tch::Device,
}

impl Instance {
    /// Applies `overrides` (the service's `repository.*`) over this model's `[instance]`, then
    /// `default_lanes`; every problem is reported together.
    pub fn resolve(
        &self,
        overrides: &crate::config::RepositorySettings,
        default_lanes: usize,
    ) -> Result<RunOn, String> {
        let lanes = overrides.lanes.or(self.lanes).unwrap_or(default_lanes);
        let threads = overrides.threads.or(self.threads).unwrap_or(1);
        let device = overrides
            .device
            .clone()
            .or_else(|| self.device.clone())
            .unwrap_or_else(|| "cpu".into());
        let mut errors = Vec::new();
        if lanes == 0 || threads == 0 {
            errors.push("`instance.lanes` and `instance.threads` must be at least 1".to_string());
        }
        // A device this process cannot use refuses the version here, with the reason, instead
        // of failing inside the first forward.
        let device = parse_device(&device)
            .map_err(|e| format!("`instance.device`: {e}"))
            .and_then(|d| crate::device::check_available(d).map(|()| d));
        match device {
            Ok(device) if errors.is_empty() => Ok(RunOn {
                lanes,
                threads,
                device,
            }),
            Ok(_) => Err(errors.join("; ")),
            Err(e) => {
                errors.push(e);
                Err(errors.join("; "))
            }
        }
    }
}

/// Parses a device name into a tch device.
pub fn parse_device(s: &str) -> Result<tch::Device, String> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| format!("expected `cpu`, `cuda` or `cuda:N`, got `{other}`")),
    }
}

impl ModelSpec {
    /// Reads and checks `dir/model.toml`; every problem is reported together.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        let spec: ModelSpec =
            toml::from_str(&text).map_err(|e| format!("`{}`: {e}", path.display()))?;
        let mut errors = Vec::new();
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if spec.name != dir_name {
            errors.push(format!(
                "`name` is `{}` but the directory is `{dir_name}`",
                spec.name
            ));
        }
        if spec.platform != "torchscript" {
            errors.push(format!(
                "`platform` must be `torchscript`, got `{}`",
                spec.platform
            ));
        }
        if spec.inputs.len() != 1 {
            errors.push(format!(
                "exactly one input is supported, got {}",
                spec.inputs.len()
            ));
        }
        if spec.outputs.is_empty() {
            errors.push("at least one output is required".into());
        }
        for t in spec.inputs.iter().chain(&spec.outputs) {
            if t.datatype != "FP32" {
                errors.push(format!(
                    "tensor `{}`: only `FP32` is supported, got `{}`",
                    t.name, t.datatype
                ));
            }
            if t.dims.is_empty() || t.dims.iter().any(|d| *d <= 0) {
                errors.push(format!(
                    "tensor `{}`: dims must be positive, got {:?}",
                    t.name, t.dims
                ));
            }
        }
        if let Some(p) = &spec.preprocess {
            let channels = match p.color.as_str() {
                "rgb" => 3,
                "gray" => 1,
                other => {
                    errors.push(format!(
                        "`preprocess.color` must be `rgb` or `gray`, got `{other}`"
                    ));
                    0
                }
            };
            if p.mean.len() != channels || p.std.len() != channels {
                errors.push(format!(
                    "`preprocess.mean`/`std` need {channels} values for `{}`",
                    p.color
                ));
            }
            if p.std.contains(&0.0) {
                errors.push("`preprocess.std` must not contain 0".into());
            }
            if let Some(input) = spec.inputs.first() {
                let want = [channels as i64, p.crop[0] as i64, p.crop[1] as i64];
                if input.dims != want {
                    errors.push(format!(
                        "input dims {:?} do not match preprocess output {want:?}",
                        input.dims
                    ));
                }
            }
        }
        if spec.batching.max_batch_size == 0 {
            errors.push("`batching.max_batch_size` must be at least 1".into());
        }
        if spec.batching.queue_capacity < spec.batching.max_batch_size {
            errors.push(format!(
                "`batching.queue_capacity` ({}) must be at least `max_batch_size` ({})",
                spec.batching.queue_capacity, spec.batching.max_batch_size
            ));
        }
        if spec.instance.lanes == Some(0) || spec.instance.threads == Some(0) {
            errors.push("`instance.lanes` and `instance.threads` must be at least 1".into());
        }
        if let Some(Err(e)) = spec.instance.device.as_deref().map(parse_device) {
            errors.push(format!("`instance.device`: {e}"));
        }
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(format!("`{}`: {}", path.display(), errors.join("; ")))
        }
    }

    /// The model's labels, if it declares any.
    pub fn load_labels(&self, dir: &Path) -> Result<Option<Vec<String>>, String> {
        match self.labels.as_deref() {
            None => Ok(None),
            Some("builtin:imagenet1k") => Ok(Some(
                tch::vision::imagenet::CLASSES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            Some(file) => {
                let path = dir.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read labels `{}`: {e}", path.display()))?;
                Ok(Some(text.lines().map(str::to_owned).collect()))
            }
        }
    }

    /// Index of the output called `name`.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }
}
