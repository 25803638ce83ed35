//! Graceful shutdown of the vision binary with work in flight, end to end. (Hot reload,
//! readiness and drain of every model service: `model_services.rs`.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use marquee_e2e::*;
use marquee_proto::vision::image_input::Source;
use marquee_proto::vision::image_service_client::ImageServiceClient;
use marquee_proto::vision::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_finishes_in_flight_calls_then_refuses_new_ones() {
    let mut child = Command::new(workspace_binary("marquee-vision"))
        .env("MARQUEE__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("MARQUEE__SERVER__ADMIN_ADDR", "127.0.0.1:0")
        .env("MARQUEE__SERVER__DRAIN_DELAY_MS", "300")
        .env("MARQUEE__REPOSITORY__PATH", model_repo())
        .env("MARQUEE__REPOSITORY__MODELS", "efficientnet_lite0")
        .env("MARQUEE__REPOSITORY__LANES", "1")
        .env("MARQUEE__REPOSITORY__THREADS", "1")
        .env("MARQUEE__REPOSITORY__PROFILE_BATCHING", "false")
        .env("MARQUEE__REPOSITORY__POLL_INTERVAL_MS", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grpc = line
        .split("grpc=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let admin: std::net::SocketAddr = line.split("admin=").nth(1).unwrap().trim().parse().unwrap();
    let url = format!("http://{grpc}");
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    // Work that keeps the single lane busy well past the drain delay: preprocessed tensors (no
    // decoding, which in a debug build is slower than the model and kept the queue short), more
    // than the lane takes in one batch, so some always wait while it computes.
    let tensor = ImageInput {
        source: Some(Source::Tensor(marquee_proto::common::Tensor {
            shape: vec![3, 224, 224],
            float_data: vec![0.1; 3 * 224 * 224],
            raw_data: Default::default(),
        })),
    };
    let in_flight: Vec<_> = (0..8)
        .map(|_| {
            let mut c = ImageServiceClient::new(channel.clone());
            let req = ClassifyBatchRequest {
                model: "efficientnet_lite0".into(),
                images: vec![tensor.clone(); 8],
                top_k: 1,
            };
            tokio::spawn(async move { c.classify_batch(req).await })
        })
        .collect();
    // SIGTERM only once work is queued (observed on the admin port, not slept).
    wait_until("queued images", Duration::from_secs(60), || async {
        let (_, body) = http_get(admin, "/metrics").await;
        let queued = body
            .lines()
            .find(|l| l.starts_with("marquee_batcher_queue_depth{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        (queued >= 8.0).then_some(())
    })
    .await;
    // SAFETY: kill(2) on a child process this test spawned and still owns.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);

    // Readiness flips first, while the calls are still running.
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    assert!(
        in_flight.iter().any(|h| !h.is_finished()),
        "work is still in flight when NOT_SERVING is reported"
    );

    // Once the listener closes, new connections are refused while old calls finish.
    let refused_while_busy =
        wait_until("the listener to close", Duration::from_secs(60), || async {
            let refused = tonic::transport::Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .is_err();
            refused.then(|| in_flight.iter().any(|h| !h.is_finished()))
        })
        .await;
    assert!(
        refused_while_busy,
        "new connections were refused while in-flight calls were still running"
    );

    for h in in_flight {
        let resp = h
            .await
            .unwrap()
            .expect("in-flight call completes after SIGTERM")
            .into_inner();
        assert_eq!(resp.items.len(), 8);
        assert!(resp.items.iter().all(|i| matches!(
            i.result,
            Some(classify_batch_item::Result::Classification(_))
        )));
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after drain: {status:?}");
}
