//! The vision service: image classification and embeddings over `marquee.vision.v1` and the
//! Open Inference Protocol, on the shared serving core.
#![forbid(unsafe_code)]

pub mod decode;
pub mod preprocess;
pub mod service;

use marquee_core::config::{
    KeysUsed, RepositorySettings, ServerSettings, TelemetrySettings, Validate,
    validate_model_service,
};
use marquee_core::kit::{ModelServer, Running};
use marquee_core::tensor::TensorFamily;
use marquee_proto::vision::image_service_server::ImageServiceServer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-vision";
/// `--help` of the binary.
pub const ABOUT: &str = "Marquee vision service: image classification and embeddings over gRPC";

/// All settings of the vision service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub repository: RepositorySettings,
    pub telemetry: TelemetrySettings,
    pub vision: VisionSettings,
}

/// Image limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionSettings {
    /// Largest encoded image accepted.
    pub max_image_bytes: usize,
    /// Largest decoded image (width × height) accepted; checked from the header, before decoding.
    pub max_pixels: u64,
    /// Most images in one `ClassifyBatch`.
    pub max_batch_items: usize,
    /// Longest side ÷ shortest side accepted, checked from the header.
    pub max_aspect_ratio: u32,
    /// Images decoded at the same time.
    pub decode_workers: usize,
    /// Images admitted and waiting for a decode worker, across all calls.
    pub decode_queue: usize,
}

/// Panoramas (4:1 to 10:1), web banners (728×90 is about 8:1) and posters pass 20:1; a strip
/// of 1×16,000,000 pixels, which made the resizer ask for a 65 GB image, does not.
pub const DEFAULT_MAX_ASPECT_RATIO: u32 = 20;
/// One decode per core of the 2-core reference machine. A decode of an image at the limits
/// can hold about 300 MB (decoded + converted buffers), so this also bounds decode memory.
pub const DEFAULT_DECODE_WORKERS: usize = 2;
/// Two full batches (`max_batch_items`) waiting: a few seconds of decoding, beyond which a
/// caller is better told to retry elsewhere than to wait.
pub const DEFAULT_DECODE_QUEUE: usize = 512;

impl Default for VisionSettings {
    fn default() -> Self {
        Self {
            // 8 MiB holds any photo a product would classify; larger is a mistake or an attack.
            max_image_bytes: 8 << 20,
            // 40 megapixels: a modern phone photo; 4 bytes a pixel bounds decode memory at 160 MB.
            max_pixels: 40_000_000,
            max_batch_items: 256,
            max_aspect_ratio: DEFAULT_MAX_ASPECT_RATIO,
            decode_workers: DEFAULT_DECODE_WORKERS,
            decode_queue: DEFAULT_DECODE_QUEUE,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        validate_model_service(
            "vision",
            KeysUsed {
                lanes: true,
                batching: true,
            },
            (&self.server, &self.repository, &self.telemetry),
            errors,
        );
        if self.vision.max_image_bytes == 0
            || self.vision.max_image_bytes > self.server.max_message_bytes
        {
            errors.push(format!(
                "`vision.max_image_bytes` must be in 1..=`server.max_message_bytes` ({}), got {}",
                self.server.max_message_bytes, self.vision.max_image_bytes
            ));
        }
        if self.vision.max_pixels == 0 {
            errors.push("`vision.max_pixels` must be at least 1, got 0".into());
        }
        if self.vision.max_batch_items == 0 {
            errors.push("`vision.max_batch_items` must be at least 1, got 0".into());
        }
        if self.vision.max_aspect_ratio == 0 {
            errors.push("`vision.max_aspect_ratio` must be at least 1, got 0".into());
        }
        // Decodes run on the runtime's blocking threads: more workers than threads would
        // queue inside tokio's pool again, where nothing bounds or cancels them.
        let threads = self.server.blocking_threads.max(1);
        if self.vision.decode_workers == 0 || self.vision.decode_workers > threads {
            errors.push(format!(
                "`vision.decode_workers` must be in 1..=`server.blocking_threads` ({threads}), got {}",
                self.vision.decode_workers
            ));
        }
        // A batch is admitted whole, so the largest one must fit.
        if self.vision.decode_queue < self.vision.max_batch_items {
            errors.push(format!(
                "`vision.decode_queue` must be at least `vision.max_batch_items` ({}), got {}",
                self.vision.max_batch_items, self.vision.decode_queue
            ));
        }
    }
}

marquee_core::service_settings!(Settings);

/// The vision service's model server.
pub type VisionServer = ModelServer<TensorFamily>;

/// Loads the models and starts serving; returns once ready, with the bound addresses.
pub async fn start(
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running<TensorFamily>> {
    let kit = VisionServer::load(
        NAME,
        settings.server.clone(),
        settings.repository.clone(),
        |_| Ok(TensorFamily),
    )
    .await?;
    let decoders = decode::DecodePool::new(
        settings.vision.decode_workers,
        settings.vision.decode_queue,
        &kit.metrics.registry,
    );
    let vision = service::Vision::new(
        kit.repo.clone(),
        settings.server.clone(),
        settings.vision.clone(),
        decoders,
    );
    let vision = ImageServiceServer::new(vision)
        .max_decoding_message_size(settings.server.max_message_bytes);
    kit.serve_api(vision, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_every_bad_decode_setting_is_reported() {
        let mut s = Settings::default();
        // The repository is checked too; any directory will do here.
        s.repository.path = std::env::temp_dir();
        let mut errors = Vec::new();
        s.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");

        s.vision.max_aspect_ratio = 0;
        s.vision.decode_workers = s.server.blocking_threads + 1;
        s.vision.decode_queue = s.vision.max_batch_items - 1;
        let mut errors = Vec::new();
        s.validate(&mut errors);
        let all = errors.join("\n");
        for needle in [
            "`vision.max_aspect_ratio` must be at least 1, got 0",
            "`vision.decode_workers` must be in 1..=`server.blocking_threads` (4), got 5",
            "`vision.decode_queue` must be at least `vision.max_batch_items` (256), got 255",
        ] {
            assert!(all.contains(needle), "`{needle}` missing from:\n{all}");
        }
    }
}
