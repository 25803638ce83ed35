//! The vision service: image classification and embeddings over `marquee.vision.v1` and the
//! Open Inference Protocol, on the shared serving core.
#![forbid(unsafe_code)]

pub mod preprocess;
pub mod service;

use marquee_core::config::{RepositorySettings, ServerSettings, TelemetrySettings, Validate};
use marquee_core::server::{Core, Running};
use marquee_proto::vision::image_service_server::ImageServiceServer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Service name in metadata, logs and traces.
pub const NAME: &str = "marquee-vision";

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
}

impl Default for VisionSettings {
    fn default() -> Self {
        Self {
            // 8 MiB holds any photo a product would classify; larger is a mistake or an attack.
            max_image_bytes: 8 << 20,
            // 40 megapixels: a modern phone photo; 4 bytes a pixel bounds decode memory at 160 MB.
            max_pixels: 40_000_000,
            max_batch_items: 256,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        self.server.validate(errors);
        self.repository.validate(errors);
        self.telemetry.validate(errors);
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
    }
}

/// Loads the models and starts serving; returns once ready, with the bound addresses.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let core = Core::load(NAME, settings.server.clone(), settings.repository.clone()).await?;
    let vision = service::Vision::new(
        core.repo.clone(),
        settings.server.clone(),
        settings.vision.clone(),
    );
    let svc = ImageServiceServer::new(vision)
        .max_decoding_message_size(settings.server.max_message_bytes);
    let routes = tonic::service::Routes::new(svc);
    core.serve(routes, shutdown).await
}
