//! A closed-loop gRPC load client: `concurrency` callers on one thread, each sending its next
//! request as soon as the last one returns, for a fixed time.

use std::time::{Duration, Instant};

use clap::Args;
use marquee_proto::common::Tensor;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::{ClassifyRequest, ImageInput};
use serde::{Deserialize, Serialize};

#[derive(Args, Clone)]
pub struct LoadArgs {
    /// gRPC address of the server.
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub model: String,
    /// `raw` (preprocessed tensor as raw f32 bytes) or `encoded` (an image file's bytes).
    #[arg(long, default_value = "raw")]
    pub input: String,
    /// Image file for `encoded`.
    #[arg(long)]
    pub image: Option<std::path::PathBuf>,
    /// Input dims for `raw`, e.g. `1,28,28`.
    #[arg(long, value_delimiter = ',')]
    pub dims: Vec<i64>,
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Sent as `x-api-key` (for the gateway).
    #[arg(long)]
    pub api_key: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LoadResult {
    pub calls: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds the load client itself used, per second of wall time.
    pub client_cpu: f64,
}

pub fn run(a: LoadArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(drive(a))?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

async fn drive(a: LoadArgs) -> anyhow::Result<LoadResult> {
    let source = match a.input.as_str() {
        "raw" => {
            let n: i64 = a.dims.iter().product();
            // A deterministic, non-constant tensor.
            let raw: Vec<u8> = (0..n)
                .flat_map(|i| (((i % 97) as f32) / 97.0 - 0.5).to_le_bytes())
                .collect();
            Source::Tensor(Tensor {
                shape: a.dims.clone(),
                raw_data: raw.into(),
                ..Default::default()
            })
        }
        "encoded" => {
            Source::Encoded(std::fs::read(a.image.as_ref().expect("--image for encoded"))?.into())
        }
        other => anyhow::bail!("--input must be raw or encoded, got {other}"),
    };
    let req = ClassifyRequest {
        model: a.model.clone(),
        image: Some(ImageInput {
            source: Some(source),
        }),
        top_k: 1,
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", a.addr))?
        .connect()
        .await?;
    // Warm the connection and the server's path before timing.
    let key: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        a.api_key.as_deref().map(str::parse).transpose()?;
    let request = move |r: &ClassifyRequest| {
        let mut req = tonic::Request::new(r.clone());
        if let Some(k) = &key {
            req.metadata_mut().insert("x-api-key", k.clone());
        }
        req
    };
    let mut warm = ImageServiceClient::new(channel.clone());
    for _ in 0..5 {
        warm.classify(request(&req)).await?;
    }
    let cpu0 = crate::self_cpu_seconds();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(a.seconds);
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|_| {
            let mut client = ImageServiceClient::new(channel.clone());
            let req = req.clone();
            let request = request.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                while Instant::now() < until {
                    let t = Instant::now();
                    match client.classify(request(&req)).await {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = crate::self_cpu_seconds() - cpu0;
    lat.sort_by(f64::total_cmp);
    Ok(LoadResult {
        calls: lat.len(),
        errors,
        rps: lat.len() as f64 / wall,
        p50_ms: crate::percentile(&lat, 0.5),
        p99_ms: crate::percentile(&lat, 0.99),
        client_cpu: cpu / wall,
    })
}
